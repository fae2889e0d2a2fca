import math
import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distlap.runtime import Timer, predict, resolve_device, seed_everything, set_threads

CPU = torch.device("cpu")


def test_predict_is_the_softmax_of_the_logits_in_order():
    torch.manual_seed(0)
    model, x = nn.Linear(4, 3), torch.randn(50, 4)
    loader = DataLoader(TensorDataset(x, torch.arange(50) % 3), batch_size=16)
    probs, labels = predict(model, loader, CPU)
    torch.testing.assert_close(probs, torch.softmax(model(x), dim=-1).detach())
    assert labels.tolist() == (torch.arange(50) % 3).tolist()
    assert not math.isnan(probs.sum().item())


def test_seed_everything_repeats_draws():
    seed_everything(7)
    a = torch.rand(3)
    seed_everything(7)
    torch.testing.assert_close(torch.rand(3), a)


def test_threads_follow_the_reservation(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_threads() == 1 and torch.get_num_threads() == 1
        assert set_threads(2) == 2
    finally:
        torch.set_num_threads(before)


def test_cuda_asked_for_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(RuntimeError, match="train.device=auto or cpu"):
        resolve_device("cuda")
    assert resolve_device("auto") == CPU


def test_timer_measures_the_block():
    with Timer() as t:
        time.sleep(0.05)
    assert 0.05 <= t.seconds < 5
