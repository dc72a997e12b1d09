"""The native CPU thread pool: concurrent callers, forked children, exceptions."""
from __future__ import annotations

import multiprocessing as mp
import threading

import pytest
import torch

import nnmark
from nnmark import ops

from conftest import num_threads


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(700_000, generator=g), torch.randn(600_001, generator=g)]


def test_concurrent_python_threads_get_the_same_answers():
    ts = _data()
    k = sum(t.numel() for t in ts) // 3
    with num_threads(2):
        want = ops.magnitude_threshold(ts, k)
        got, errors = [], []

        def work():
            try:
                for _ in range(5):
                    got.append(ops.magnitude_threshold(ts, k))
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert not errors and len(got) == 20 and all(g == want for g in got)


def _child(q):
    ts = _data()
    q.put(ops.magnitude_threshold(ts, sum(t.numel() for t in ts) // 2))


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="no fork on this platform")
def test_forked_child_after_the_pool_started_does_not_hang():
    ts = _data()
    with num_threads(2):
        want = ops.magnitude_threshold(ts, sum(t.numel() for t in ts) // 2)  # the pool exists now
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_child, args=(q,))
        p.start()
        p.join(timeout=60)
        alive = p.is_alive()
        if alive:
            p.kill()
    assert not alive, "the forked child hung in the native thread pool"
    assert p.exitcode == 0 and q.get(timeout=5) == want


def test_a_refused_call_leaves_the_pool_working():
    ts = _data()
    with num_threads(2):
        with pytest.raises(ValueError, match="k must be"):
            ops.magnitude_threshold(ts, 0)
        thr, below, equal = ops.magnitude_threshold(ts, 5)
        assert below < 5 <= below + equal
    assert nnmark.get_num_threads() >= 1
