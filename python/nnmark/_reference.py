"""Plain versions of the native ops, for tests and benchmark baselines.

numpy float64, written straight from key spec v1 (DESIGN.md §4), plus a torch
version of the projection matrix that regenerates X chunk by chunk (the
"plain torch way" in benchmarks/bench_projection.py).
"""
from __future__ import annotations

import numpy as np
import torch

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10, vectorised over numpy uint64 arrays holding uint32 values."""
    c0, c1, c2, c3 = (np.asarray(v, dtype=np.uint64) & MASK32 for v in (c0, c1, c2, c3))
    k0, k1 = np.uint64(k0), np.uint64(k1)
    for _ in range(10):
        p0 = np.uint64(M0) * c0
        p1 = np.uint64(M1) * c2
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & np.uint64(MASK32),
                          (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & np.uint64(MASK32))
        k0 = (k0 + np.uint64(W0)) & np.uint64(MASK32)
        k1 = (k1 + np.uint64(W1)) & np.uint64(MASK32)
    return c0, c1, c2, c3


def projection_matrix(subkey, T: int, N: int, col0: int = 0) -> np.ndarray:
    """X[:, col0:col0+N] as int8 in {-1, +1}, shape [T, N]."""
    k0, k1 = (int(v) for v in subkey)
    i = np.arange(col0, col0 + N, dtype=np.uint64)
    X = np.empty((T, N), dtype=np.int8)
    for b in range((T + 127) // 128):
        words = philox4x32_10(i & np.uint64(MASK32), i >> np.uint64(32), np.full_like(i, b), np.zeros_like(i), k0, k1)
        for t in range(128 * b, min(T, 128 * b + 128)):
            j = t & 127
            bit = (words[j >> 5] >> np.uint64(j & 31)) & np.uint64(1)
            X[t] = np.where(bit == 1, 1, -1)
    return X


def projection_forward(w, subkey, T: int) -> np.ndarray:
    """p = X . w in float64; w is [N] or [C, N]."""
    w = np.asarray(w, dtype=np.float64)
    X = projection_matrix(subkey, T, w.shape[-1]).astype(np.float64)
    return w @ X.T


def projection_many_keys(w, subkeys, T: int) -> np.ndarray:
    """p[k] = X_k . w in float64 for one carrier w [N] and subkeys [K, 2]: [K, T]."""
    return np.stack([projection_forward(w, sk, T) for sk in np.asarray(subkeys)])


def projection_backward(gp, subkey, N: int) -> np.ndarray:
    """gw = X^T . gp in float64; gp is [T] or [C, T]."""
    gp = np.asarray(gp, dtype=np.float64)
    X = projection_matrix(subkey, gp.shape[-1], N).astype(np.float64)
    return gp @ X


def torch_projection_matrix(subkey, T: int, col0: int, n: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """X[:, col0:col0+n] as a torch tensor of +-1, computed with torch integer ops.

    Philox with 64-bit torch integers: the plain-torch way to avoid storing X.
    """
    k0, k1 = (int(v) for v in subkey)
    m32 = MASK32
    i = torch.arange(col0, col0 + n, dtype=torch.int64, device=device)
    rows = []
    for b in range((T + 127) // 128):
        c0, c1 = i & m32, i >> 32
        c2 = torch.full_like(i, b)
        c3 = torch.zeros_like(i)
        ka, kb = k0, k1
        for _ in range(10):
            p0 = c0 * M0  # < 2^64 but int64 is signed: split the products instead
            p1 = c2 * M1
            hi0 = _mulhi32(c0, M0)
            hi1 = _mulhi32(c2, M1)
            c0, c1, c2, c3 = (hi1 ^ c1 ^ ka), (p1 & m32), (hi0 ^ c3 ^ kb), (p0 & m32)
            ka, kb = (ka + W0) & m32, (kb + W1) & m32
        words = (c0, c1, c2, c3)
        for t in range(128 * b, min(T, 128 * b + 128)):
            j = t & 127
            rows.append(((words[j >> 5] >> (j & 31)) & 1).to(dtype) * 2 - 1)
    return torch.stack(rows)


def _mulhi32(a: torch.Tensor, m: int) -> torch.Tensor:
    """High 32 bits of a * m for a, m < 2^32, in int64 without overflow."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    m_hi, m_lo = m >> 16, m & 0xFFFF
    lo = a_lo * m_lo
    mid1 = a_hi * m_lo
    mid2 = a_lo * m_hi
    hi = a_hi * m_hi
    carry = ((lo >> 16) + (mid1 & 0xFFFF) + (mid2 & 0xFFFF)) >> 16
    return (hi + (mid1 >> 16) + (mid2 >> 16) + carry) & MASK32


def trigger_verify(logits, labels, null_rate=None) -> dict[str, np.ndarray]:
    """Trigger-set verification in float64 numpy + scipy (see nnmark.ops.trigger_verify).

    ``logits`` [K, B, C] (or [B, C]), ``labels`` [B]. Top-1 is ``np.argmax`` (first
    maximum); a row with a NaN is a miss; the mean margin leaves NaN margins out.
    """
    x = np.asarray(logits, dtype=np.float64)
    single = x.ndim == 2
    if single:
        x = x[None]
    K, B, C = x.shape
    y = np.asarray(labels, dtype=np.int64)
    p0 = 1.0 / C if null_rate is None else float(null_rate)
    rows = np.arange(B)
    has_nan = np.isnan(x).any(axis=2)                             # [K, B]
    hit = (np.argmax(x, axis=2) == y[None, :]) & ~has_nan         # [K, B]
    lab = x[:, rows, y]                                           # [K, B]
    others = x.copy()
    others[:, rows, y] = -np.inf
    with np.errstate(invalid="ignore"):
        row_margin = lab - others.max(axis=2)                     # NaN rows give NaN
    hits = hit.sum(axis=1).astype(np.int64)
    keep = ~np.isnan(row_margin)
    count = keep.sum(axis=1)
    total = np.where(keep, row_margin, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        margin = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    p_value = np.array([_binomial_sf(int(h), B, p0) for h in hits])
    out = {"hits": hits, "margin": margin, "p_value": p_value}
    return {k: v[0] for k, v in out.items()} if single else out


def _binomial_sf(h: int, n: int, p: float) -> float:
    """P[Binomial(n, p) >= h] by scipy; where scipy's sf underflows to 0 (below ~1e-297),
    the pmf terms summed in log space instead."""
    from scipy.special import logsumexp
    from scipy.stats import binom

    if h <= 0:
        return 1.0
    v = float(binom.sf(h - 1, n, p))
    if v == 0.0 and h <= n:
        v = float(np.exp(logsumexp(binom.logpmf(np.arange(h, n + 1), n, p))))
    return v
