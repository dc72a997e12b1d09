"""Small models run on one torch thread, scoped (nnmark._threads): the caller's thread
count always comes back, big work keeps it, and the work size is counted from shapes."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from nnmark import _threads
from nnmark._threads import SMALL_MACS, forward_macs, small_work_threads, threads_for, torch_threads
from nnmark.attacks import channel_activations, finetune
from nnmark.demo import DigitsNet, load_digits_split, run_demo


@pytest.fixture(autouse=True)
def two_threads():
    """Every test starts from 2 torch threads (also on a 1-core machine), and leaves
    the count as it found it."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


class Spy(nn.Module):
    """Records torch's thread count at each forward."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.seen: list[int] = []

    def forward(self, x):
        self.seen.append(torch.get_num_threads())
        return self.inner(x)


def test_torch_threads_restores_the_callers_count():
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with torch_threads(None):
        assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="boom"):
        with torch_threads(1):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 2
    with torch_threads(1):  # nested: each level gets its own count back
        with torch_threads(3):
            assert torch.get_num_threads() == 3
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError):
            with torch_threads(bad):
                pass


def test_forward_macs_counts_linear_and_conv_layers_from_shapes():
    lin = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    assert forward_macs(lin, torch.zeros(7, 10)) == 7 * (10 * 20 + 20 * 5)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert forward_macs(conv, torch.zeros(2, 3, 6, 6)) == 2 * 6 * 6 * 8 * 3 * 9
    # DigitsNet: 0.34M multiply-adds an image, 21.6M for a batch of 64: small work.
    macs = forward_macs(DigitsNet(), torch.zeros(64, 1, 8, 8))
    assert macs == 64 * (16 * 9 * 64 + 32 * 16 * 9 * 64 + 512 * 64 + 64 * 10)
    assert threads_for(macs) == 1
    assert threads_for(SMALL_MACS) is None


def test_forward_macs_overestimates_layers_it_does_not_know():
    class Odd(nn.Module):  # a parameter used in a way the counter cannot see
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(16, 16))

        def forward(self, x):
            return x @ self.w

    # upper bound: parameters x output elements (exact would be 4 * 16 * 16)
    assert forward_macs(Odd(), torch.zeros(4, 16)) == 16 * 16 * 4 * 16
    # an output that is no tensor: the work is taken as big
    class NoTensor(nn.Linear):
        def forward(self, x):
            return None

    assert forward_macs(NoTensor(3, 3), torch.zeros(1, 3)) == float("inf")


def test_small_model_runs_on_one_thread_after_the_first_forward_and_hooks_go():
    model = Spy(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)))
    x = torch.randn(64, 64)
    with small_work_threads(model):
        for _ in range(3):
            model(x)
        assert torch.get_num_threads() == 1
    assert model.seen == [2, 1, 1]  # the first forward is measured at the caller's count
    assert torch.get_num_threads() == 2
    assert all(not m._forward_hooks for m in model.modules())


def test_big_work_keeps_the_callers_threads():
    model = Spy(nn.Linear(2048, 2048))
    x = torch.zeros(64, 2048)  # 268M multiply-adds > SMALL_MACS
    with small_work_threads(model):
        model(x)
        model(x)
    assert model.seen == [2, 2] and torch.get_num_threads() == 2
    assert all(not m._forward_hooks for m in model.modules())


def test_small_work_threads_restores_on_error_and_leaves_one_thread_alone():
    model = nn.Linear(4, 2)
    with pytest.raises(RuntimeError, match="boom"):
        with small_work_threads(model):
            model(torch.zeros(1, 4))
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 2 and not model._forward_hooks
    torch.set_num_threads(1)
    with small_work_threads(model):  # nothing to do: no hooks at all
        assert not model._forward_hooks
        torch.set_num_threads(3)  # a change the block makes itself stays
    assert torch.get_num_threads() == 3


def test_the_threshold_is_what_decides(monkeypatch):
    model = Spy(nn.Linear(8, 8))
    monkeypatch.setattr(_threads, "SMALL_MACS", 8 * 8 * 4)
    with small_work_threads(model):
        model(torch.zeros(4, 8))  # exactly at the threshold: not small
        model(torch.zeros(4, 8))
    assert model.seen == [2, 2]


def test_attacks_train_small_models_on_one_thread_and_restore():
    data = load_digits_split(0)
    small = (data.x_train[:256], data.y_train[:256])
    model = Spy(DigitsNet())
    finetune(model, small, mode="FTAL", epochs=1, batch_size=64)
    assert model.seen == [2, 1, 1, 1] and torch.get_num_threads() == 2
    model.seen.clear()
    channel_activations(model, "inner.features.2", small[0], batch_size=128)
    assert model.seen == [2, 1] and torch.get_num_threads() == 2


def test_demo_runs_on_one_thread_and_gives_the_callers_count_back(tmp_path):
    seen = []
    run_demo(tmp_path, unmarked=1, epochs=1, robustness=False, frontier=0, progress=lambda msg: seen.append(torch.get_num_threads()))
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2
