"""Bad input gets an error naming the fix, and a refused step changes nothing."""

import pytest
import torch
from helpers import assert_bits_equal, randn, snapshot

from forge_megatron import ForgeState, fused_update
from forge_megatron.core.update import resolve_backend


@pytest.fixture
def problem(gen):
    weight = randn(gen, 17, 33)
    return randn(gen, 8, 33), randn(gen, 8, 17), weight, ForgeState(weight, "adamw")


@pytest.mark.parametrize("change, error, message", [
    (lambda x, dy, w: (x[:, :32], dy, w), ValueError,
     r"weight is \[out=17, in=33\], so x must be \[\.\.\., 33\] and dy \[\.\.\., 17\]; got x \(8, 32\)"),
    (lambda x, dy, w: (x, dy[:7], w), ValueError, "same leading"),
    (lambda x, dy, w: (x[0], dy, w), ValueError, "at least 2 dims"),
    (lambda x, dy, w: (x.half(), dy.half(), w), TypeError, "one dtype among float32, bfloat16; got torch.float16"),
    (lambda x, dy, w: (x, dy.bfloat16(), w), TypeError, "share one dtype"),
    (lambda x, dy, w: (x.int(), dy.int(), w), TypeError, "float32, bfloat16"),
    (lambda x, dy, w: (x, dy, w.double()), TypeError, "weight dtype torch.float64 is not supported; supported: float32"),
    (lambda x, dy, w: (x, dy, w.t().contiguous().t()), ValueError, "weight must be contiguous"),
    (lambda x, dy, w: (x.to("meta"), dy, w), ValueError, "one device"),
    (lambda x, dy, w: (x.numpy(), dy, w), TypeError, "x must be a torch.Tensor"),
])
def test_bad_inputs_are_refused_and_nothing_changes(problem, change, error, message):
    x, dy, weight, state = problem
    w0, s0 = snapshot(weight, state)
    x, dy, w = change(x, dy, weight)
    with pytest.raises(error, match=message):
        fused_update(x, dy, w, state)
    assert state.step == 0
    assert_bits_equal(weight, w0, "weight after a refused step")
    for name, tensor in state.tensors.items():
        assert_bits_equal(tensor, s0[name], f"{name} after a refused step")


def test_state_of_another_shape_is_refused(problem, gen):
    x, dy, weight, _ = problem
    with pytest.raises(ValueError, match=r"state was built for a weight of shape \(5, 5\)"):
        fused_update(x, dy, weight, ForgeState(torch.zeros(5, 5), "adamw"))


@pytest.mark.parametrize("scale, error, message", [
    ("2", TypeError, "grad_scale must be a number or a 0-dim tensor"),
    (torch.ones(2), ValueError, "grad_scale tensor must have one element"),
])
def test_bad_grad_scale(problem, scale, error, message):
    x, dy, weight, state = problem
    with pytest.raises(error, match=message):
        fused_update(x, dy, weight, state, grad_scale=scale)


def test_backend_choice(monkeypatch):
    assert resolve_backend(torch.device("cpu")) == "torch"
    assert resolve_backend(torch.device("cuda", 0)) == "triton"
    monkeypatch.setenv("FORGE_BACKEND", "torch")
    assert resolve_backend(torch.device("cuda", 0)) == "torch"
    with pytest.raises(ValueError, match=r"unknown FORGE backend 'cutlass'; choose one of \('triton', 'torch'\)"):
        resolve_backend(torch.device("cpu"), "cutlass")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs a CUDA device.*backend='torch'.*TRITON_INTERPRET=1"):
        resolve_backend(torch.device("cpu"), "triton")
