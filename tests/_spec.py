"""An independent implementation of key specification v1 (DESIGN.md §4), for tests.

Written from the design document alone -- it deliberately does not import
``nnmark`` (nor ``nnmark._reference``), so a mistake shared by the library and
its own reference cannot hide here.

- Philox4x32-10 (Random123): a scalar version on Python ints and a vectorised
  one on numpy uint64 arrays holding 32-bit values.
- The projection matrix X in {-1,+1}^{T x N}: X[t, i] from column counter
  (i mod 2^32, i >> 32, t >> 7, 0), bit (t & 127) of the four output words.
- p = X . w and g = X^T . gp in float64, chunk by chunk so that large N stays
  small in memory.
- The subkey: SHA-256(secret || b"nnmark:projection:v1:" || carrier UTF-8),
  k0/k1 the little-endian uint32 of bytes 0:4 / 4:8.
"""
from __future__ import annotations

import hashlib
import struct

import numpy as np

PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers (Random123 PHILOX_M4x32_0/1)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # Weyl key increments (golden ratio, sqrt(3) - 1)
ROUNDS = 10
ROWS_PER_BLOCK = 128  # one Philox call gives 4 x 32 = 128 bits
U32 = (1 << 32) - 1
PROJECTION_DOMAIN = b"nnmark:projection:v1:"


# ------------------------------------------------------------------ Philox, scalar
def _mulhilo(a: int, b: int) -> tuple[int, int]:
    prod = a * b
    return prod >> 32, prod & U32


def philox_scalar(counter, key) -> tuple[int, int, int, int]:
    """Philox4x32-10 of one counter (4 words) under one key (2 words), Python ints."""
    x0, x1, x2, x3 = (int(v) & U32 for v in counter)
    k0, k1 = (int(v) & U32 for v in key)
    for r in range(ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W[0]) & U32
            k1 = (k1 + PHILOX_W[1]) & U32
        hi0, lo0 = _mulhilo(PHILOX_M[0], x0)
        hi1, lo1 = _mulhilo(PHILOX_M[1], x2)
        x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
    return x0, x1, x2, x3


# ------------------------------------------------------------------ Philox, vectorised
def philox_vec(x0, x1, x2, x3, k0: int, k1: int) -> np.ndarray:
    """Philox4x32-10 over arrays of counters; returns a uint64 array [4, n] of 32-bit words."""
    mask = np.uint64(U32)
    sh = np.uint64(32)
    x = [np.asarray(v, dtype=np.uint64) & mask for v in (x0, x1, x2, x3)]
    x = np.broadcast_arrays(*x)
    x0, x1, x2, x3 = (np.array(v, dtype=np.uint64) for v in x)
    m0, m1 = np.uint64(PHILOX_M[0]), np.uint64(PHILOX_M[1])
    ka, kb = int(k0) & U32, int(k1) & U32
    for r in range(ROUNDS):
        if r:
            ka = (ka + PHILOX_W[0]) & U32
            kb = (kb + PHILOX_W[1]) & U32
        p0 = x0 * m0  # < 2^64: exact in uint64
        p1 = x2 * m1
        x0, x1, x2, x3 = ((p1 >> sh) ^ x1 ^ np.uint64(ka), p1 & mask,
                          (p0 >> sh) ^ x3 ^ np.uint64(kb), p0 & mask)
    return np.stack([x0, x1, x2, x3])


# ------------------------------------------------------------------ projection matrix
def projection_block(subkey, T: int, col0: int, n: int) -> np.ndarray:
    """X[:, col0:col0+n] of spec v1 as float64 +-1, shape [T, n]."""
    k0, k1 = (int(v) for v in subkey)
    cols = np.arange(col0, col0 + n, dtype=np.uint64)
    lo, hi = cols & np.uint64(U32), cols >> np.uint64(32)
    nblk = -(-T // ROWS_PER_BLOCK)
    shifts = np.arange(32, dtype=np.uint64)
    rows = []
    for b in range(nblk):
        words = philox_vec(lo, hi, np.full(n, b, dtype=np.uint64), np.zeros(n, dtype=np.uint64), k0, k1)
        # row j = 32 * (j >> 5) + (j & 31): bit (j & 31) of word (j >> 5)
        bits = (words[:, None, :] >> shifts[None, :, None]) & np.uint64(1)  # [4, 32, n]
        rows.append(bits.reshape(ROWS_PER_BLOCK, n))
    bits = np.concatenate(rows)[:T]
    return np.where(bits == 1, 1.0, -1.0)


def projection_matrix(subkey, T: int, N: int) -> np.ndarray:
    """The whole X [T, N] (float64 +-1); mind the memory for large T * N."""
    return projection_block(subkey, T, 0, N)


def forward(w, subkey, T: int, chunk: int = 16384) -> np.ndarray:
    """p = X . w in float64; ``w`` [N] or [C, N] -> [T] or [C, T]."""
    w = np.asarray(w, dtype=np.float64)
    N = w.shape[-1]
    p = np.zeros(w.shape[:-1] + (T,), dtype=np.float64)
    for c0 in range(0, N, chunk):
        n = min(chunk, N - c0)
        X = projection_block(subkey, T, c0, n)
        p += (X @ w[..., c0:c0 + n].T).T  # X @ w.T: the fast way round for BLAS
    return p


def transpose(gp, subkey, N: int, chunk: int = 16384) -> np.ndarray:
    """g = X^T . gp in float64; ``gp`` [T] or [C, T] -> [N] or [C, N]."""
    gp = np.asarray(gp, dtype=np.float64)
    T = gp.shape[-1]
    parts = []
    for c0 in range(0, N, chunk):
        n = min(chunk, N - c0)
        parts.append(gp @ projection_block(subkey, T, c0, n))
    return np.concatenate(parts, axis=-1)


# ------------------------------------------------------------------ subkey
def subkey(secret: bytes, carrier: str) -> tuple[int, int]:
    """Spec v1 step 1: (k0, k1) from SHA-256(secret || domain || carrier as UTF-8)."""
    d = hashlib.sha256(bytes(secret) + PROJECTION_DOMAIN + carrier.encode("utf-8")).digest()
    k0, k1 = struct.unpack("<II", d[:8])
    return k0, k1


# ------------------------------------------------------------------ known answers (DESIGN.md §4)
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
