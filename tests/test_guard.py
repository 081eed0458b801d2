"""NanGuard: a NaN step is skipped with parameters and optimizer state bit-for-bit unchanged."""

import copy

import pytest
import torch
from helpers import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

import nanfuse
from nanfuse.fallback import grad_norm as torch_grad_norm

OPTIMIZERS = {
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adamw-fused": lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True),
    "adam-fused": lambda params: torch.optim.Adam(params, lr=1e-2, fused=True),
    "sgd-fused": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True),
}


def make_model():
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5))


def batch(step):
    generator = torch.Generator().manual_seed(step)
    return torch.randn(32, 8, generator=generator) * 3, torch.randint(0, 5, (32,), generator=generator)


def snapshot(model, optimizer):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())


def assert_same(a, b):
    (params_a, opt_a), (params_b, opt_b) = a, b
    for name in params_a:
        assert torch.equal(params_a[name], params_b[name]), name
    for key, state in opt_a["state"].items():
        for field, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b["state"][key][field])), (key, field)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_nan_step_is_skipped_and_training_goes_on(name):
    model = make_model()
    optimizer = OPTIMIZERS[name](model.parameters())
    guard = nanfuse.NanGuard(optimizer, max_norm=1.0)
    nan_step = 3
    for step in range(6):
        x, y = batch(step)
        nanfuse.cross_entropy(model(x), y).backward()
        if step == nan_step:
            model[0].weight.grad[2, 3] = float("nan")
            before = snapshot(model, optimizer)
        report = guard.step()
        if step == nan_step:
            assert report.found_inf.item() == 1.0 and report.nonfinite_count.item() == 1
            assert_same(before, snapshot(model, optimizer))
        else:
            assert report.found_inf.item() == 0.0
        guard.zero_grad()
    assert guard.skipped_steps.item() == 1 and guard.steps == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(guard.last_norm)


def test_fused_path_equals_clip_then_step():
    # the fused optimizer gets 1/coef as grad_scale: the same update as clipping the gradients first
    torch.manual_seed(0)
    ours, theirs = make_model(), make_model()
    theirs.load_state_dict(ours.state_dict())
    guard = nanfuse.NanGuard(torch.optim.AdamW(ours.parameters(), lr=1e-2, fused=True), max_norm=0.5)
    plain = torch.optim.AdamW(theirs.parameters(), lr=1e-2)
    for step in range(4):
        x, y = batch(step)
        torch.nn.functional.cross_entropy(ours(x), y).backward()
        torch.nn.functional.cross_entropy(theirs(x), y).backward()
        guard.step()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.5)
        plain.step()
        guard.zero_grad()
        plain.zero_grad()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert_close(a, b.double(), torch.float32)


def test_with_grad_scaler():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    guard = nanfuse.NanGuard(optimizer, max_norm=1.0, scaler=scaler)
    for step in range(4):
        x, y = batch(step)
        scaler.scale(nanfuse.cross_entropy(model(x), y)).backward()
        if step == 2:
            model[2].bias.grad[0] = float("inf")
            before = snapshot(model, optimizer)
        report = guard.step()
        if step == 2:
            assert report.found_inf.item() == 1.0
            assert_same(before, snapshot(model, optimizer))
            assert scaler.get_scale() == 2.0**9  # the scaler backed off, exactly as with its own unscale_/step/update
        else:
            assert report.total_norm.item() < 1e3  # the norm is of unscaled gradients
        guard.zero_grad()
    assert guard.skipped_steps.item() == 1


def test_state_dict_round_trip():
    model = make_model()
    guard = nanfuse.NanGuard(torch.optim.SGD(model.parameters(), lr=0.1))
    for step in range(2):
        x, y = batch(step)
        nanfuse.cross_entropy(model(x), y).backward()
        model[0].bias.grad[0] = float("nan")
        guard.step()
        guard.zero_grad()
    restored = nanfuse.NanGuard(torch.optim.SGD(model.parameters(), lr=0.1))
    restored.load_state_dict(guard.state_dict())
    assert restored.steps == 2 and restored.skipped_steps.item() == 2


class HostReads(TorchDispatchMode):
    """Records ops that read a tensor's value into Python (a host sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.startswith(("_local_scalar_dense", "item", "is_nonzero", "equal")):
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_fused_optimizer_step_reads_nothing_back(monkeypatch):
    # on CPU reading is free and the PyTorch path uses it; pretend it is not, as on a GPU
    monkeypatch.setattr(torch_grad_norm, "may_read_values", lambda tensor: False)
    model = make_model()
    guard = nanfuse.NanGuard(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), max_norm=1.0)
    for step in range(2):
        x, y = batch(step)
        nanfuse.cross_entropy(model(x), y).backward()
        if step == 1:
            model[0].weight.grad[0, 0] = float("nan")
        with HostReads() as trace:
            guard.step()
        assert trace.reads == []
        guard.zero_grad()
    assert guard.skipped_steps.item() == 1
