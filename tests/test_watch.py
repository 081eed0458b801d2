"""NanWatch on hand-built models where the truth is known: the phase, the producing module and the cause."""

import pytest
import torch
from test_guard import HostReads

import nanfuse
from nanfuse import _backend
from nanfuse.fallback import cross_entropy as torch_cross_entropy
from nanfuse.fallback import grad_norm as torch_grad_norm


class Divide(torch.nn.Module):
    def forward(self, x):
        return x / (x - x)


class LogOfZero(torch.nn.Module):
    def forward(self, x):
        return torch.log(torch.relu(x) * 0)


class Overflow(torch.autograd.Function):
    """Identity forward; a backward that overflows fp32."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * 1e30 * 1e30


class OverflowingLayer(torch.nn.Module):
    def forward(self, x):
        return Overflow.apply(x)


def sequential(middle):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), middle, torch.nn.Linear(8, 4))


def train_step(model, guard, x, y, loss_fn=nanfuse.cross_entropy):
    loss_fn(model(x), y).backward()
    report = guard.step()
    guard.zero_grad()
    return report


def watched(model, **options):
    watch = nanfuse.NanWatch(model, **options)
    guard = nanfuse.NanGuard(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), max_norm=1.0, watch=watch)
    return watch, guard


def batch(seed=0, n=8):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=generator), torch.randint(0, 4, (n,), generator=generator)


def test_clean_steps_give_no_report():
    model = sequential(torch.nn.ReLU())
    watch, guard = watched(model)
    for step in range(3):
        train_step(model, guard, *batch(step))
        with torch.no_grad():  # evaluation between steps is not kept
            model(batch(10 + step)[0])
        assert watch._calls == []
    assert watch.report() is None and watch.reports() == []


def test_nan_input_row_is_bad_input_data():
    model = sequential(torch.nn.ReLU())
    watch, guard = watched(model)
    train_step(model, guard, *batch(0))
    x, y = batch(1)
    x[3, 2] = float("nan")
    x[5, 0] = float("inf")
    train_step(model, guard, x, y)
    report = watch.report()
    assert (report.step, report.phase, report.cause) == (1, "input", "bad input data")
    assert report.tensor == "input `input`" and report.rows == [3, 5] and report.count == 2
    assert guard.skipped_steps.item() == 1


@pytest.mark.parametrize("middle", [Divide(), LogOfZero()], ids=["x/(x-x)", "log(relu(x)*0)"])
def test_unstable_module_is_named_and_not_the_layers_after_it(middle):
    model = sequential(middle)
    watch, guard = watched(model)
    train_step(model, guard, *batch(0))
    report = watch.report()
    assert (report.phase, report.cause, report.module, report.tensor) == ("forward", "unstable activation", "2",
                                                                          "output")
    assert report.passed_on == ["3"] and report.count > 0


class OwnCode(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.last = torch.nn.Linear(6, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        h = self.first(x)
        return self.last(h / (h - h))  # the NaN is made here, in this module's own code, not in `last`


def test_nan_made_in_a_modules_own_code_names_that_module():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), OwnCode())
    watch, guard = watched(model)
    train_step(model, guard, *batch(0))
    report = watch.report()
    assert (report.phase, report.cause, report.module) == ("forward", "unstable activation", "1")
    assert report.passed_on == []  # `1.last` received it; the Sequential only returned it


def test_log_of_saturated_softmax_is_an_unstable_loss():
    model = sequential(torch.nn.ReLU())
    watch, guard = watched(model)

    def naive_loss(logits, target):
        logits = logits * torch.tensor([1.0, 1.0, 1.0, 0.0]) + torch.tensor([0.0, 0.0, 0.0, 1e4])  # saturated
        return -torch.log(torch.softmax(logits, -1)).gather(1, target[:, None]).mean()

    x, y = batch(0)
    train_step(model, guard, x, torch.zeros_like(y), naive_loss)
    report = watch.report()
    assert torch.isfinite(model(x)).all()  # the model's outputs were finite
    assert (report.phase, report.cause, report.module) == ("loss", "unstable loss", "")
    assert report.count > 0


def test_overflowing_backward_is_exploding_gradients_in_that_layer():
    model = sequential(OverflowingLayer())
    watch, guard = watched(model)
    before = [p.detach().clone() for p in model.parameters()]
    train_step(model, guard, *batch(0))
    report = watch.report()
    assert (report.phase, report.cause, report.module, report.tensor) == ("backward", "exploding gradients", "2",
                                                                          "grad_input")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # skipped, and the replay left them


def defer_reads(monkeypatch):
    """As on a GPU: nothing is read on the host until report() (the clip's and the watch's free reads are off)."""
    for module in (torch_grad_norm, torch_cross_entropy, _backend):
        monkeypatch.setattr(module, "may_read_values", lambda tensor: False)


@pytest.mark.parametrize("deferred", [False, True], ids=["read-at-once", "device-history"])
def test_finite_norm_jump_is_exploding_gradients_with_the_numbers(deferred, monkeypatch):
    if deferred:
        defer_reads(monkeypatch)
    model = sequential(torch.nn.ReLU())
    watch, guard = watched(model, min_history=4)
    for step in range(6):
        train_step(model, guard, *batch(step))
    assert watch.report() is None
    x, y = batch(6)
    train_step(model, guard, x, y, lambda out, t: 1000.0 * nanfuse.cross_entropy(out, t))
    report = watch.report()
    assert (report.step, report.phase, report.cause) == (6, "backward", "exploding gradients")
    assert 300 < report.numbers["ratio"] < 3000 and report.numbers["norm"] > 100 * report.numbers["median"]
    assert report.module in {"0", "3"} and report.tensor in {"weight.grad", "bias.grad"}
    assert "x its recent median" in str(report)


def test_a_step_released_before_its_flag_was_read_is_reported_unlocalised(monkeypatch):
    defer_reads(monkeypatch)
    model = sequential(Divide())
    watch, guard = watched(model, keep=1)
    for step in range(3):
        train_step(model, guard, *batch(step))
    reports = watch.reports()
    assert [(r.step, r.cause) for r in reports] == [(0, "not localised"), (2, "unstable activation")]


def test_replay_keeps_rng_buffers_and_grads():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5), Divide(),
                                torch.nn.Linear(8, 4))
    watch, guard = watched(model)
    x, y = batch(0)
    nanfuse.cross_entropy(model(x), y).backward()
    torch.rand(3)  # the RNG moves on after the forward: the replay must put back this state, not its own end
    grads = [p.grad.clone() for p in model.parameters()]
    stats = model[1].running_mean.clone()
    rng = torch.get_rng_state()
    guard.step()  # the replay runs here (CPU: the flag is read for free)
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(model[1].running_mean, stats)
    for grad, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, grad, rtol=0, atol=0, equal_nan=True)
    assert watch.report().module == "3"


@pytest.mark.parametrize("copy_inputs", [False, True])
def test_a_refilled_input_buffer_needs_copy_inputs(copy_inputs, monkeypatch):
    # as on CUDA, the flag is read later (here: by report()), after the loop has refilled its input buffer
    defer_reads(monkeypatch)
    model = sequential(torch.nn.ReLU())
    watch, guard = watched(model, copy_inputs=copy_inputs)
    x, y = batch(0)
    buffer = x.clone()
    buffer[1, 1] = float("nan")
    train_step(model, guard, buffer, y)
    buffer.copy_(x)  # the next batch, loaded into the same buffer
    report = watch.report()
    if copy_inputs:
        assert (report.cause, report.rows) == ("bad input data", [1])
    else:  # the kept reference now holds clean data: the replay sees a clean batch (and blames the NaN gradient
        assert report.cause != "bad input data"  # kept from the real step on the loss): why copy_inputs exists


def test_watched_step_reads_nothing_back_until_report(monkeypatch):
    # on CPU reading is free and both the clip and the watch use it; pretend it is not, as on a GPU
    defer_reads(monkeypatch)
    model = sequential(Divide())
    watch, guard = watched(model)
    # a fused optimizer's state-creating first step costs the guard one read of its flag (README): create it first
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    guard.optimizer.step()
    guard.zero_grad()
    for step in range(2):
        x, y = batch(step)
        with HostReads() as trace:
            train_step(model, guard, x, y)
        assert trace.reads == []
    report = watch.report()  # the flags are read here, and the last step replayed
    assert (report.step, report.module, report.cause) == (1, "2", "unstable activation")


def test_remove_takes_the_hooks_off():
    model = sequential(torch.nn.ReLU())
    watch, _ = watched(model)
    watch.remove()
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_bench_watch_measures_three_modes_side_by_side():
    from nanfuse.benchmark import watch as bench_watch

    rows = bench_watch.measure(torch.device("cpu"), threads=(1,), steps=1, repeats=1, batch_size=2, context=4)
    assert [r["mode"] for r in rows] == ["plain", "watch", "detect_anomaly"]
    assert all(r["steps_per_s"] > 0 for r in rows) and rows[0]["relative"] == 1.0
    assert "| 1 | detect_anomaly |" in bench_watch.format_table(rows, "cpu")


class Checkpointed(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=False)


@pytest.mark.parametrize("middle", [Divide(), OverflowingLayer()], ids=["forward", "backward"])
def test_activation_checkpointing_gives_the_same_report(middle):
    plain, checkpointed = sequential(middle), sequential(Checkpointed(middle))
    expected = None
    for model, prefix in ((plain, "2"), (checkpointed, "2.inner")):
        watch, guard = watched(model)
        train_step(model, guard, *batch(0))
        report = watch.report()
        got = (report.phase, report.cause, report.tensor)
        expected = expected or got
        assert got == expected and report.module == prefix  # the recomputed forward does not change it


def test_arguments_are_checked_at_construction():
    model = sequential(torch.nn.ReLU())
    with pytest.raises(TypeError, match="model"):
        nanfuse.NanWatch(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="jump_factor"):
        nanfuse.NanWatch(model, jump_factor=float("inf"))
    with pytest.raises(TypeError, match="keep"):
        nanfuse.NanWatch(model, keep=1.5)
    with pytest.raises(TypeError, match="watch"):
        nanfuse.NanGuard(torch.optim.SGD(model.parameters(), lr=0.1), watch="yes")


def test_calls_never_observed_stay_bounded(monkeypatch):
    from nanfuse import watch as watch_module

    monkeypatch.setattr(watch_module, "MAX_CALLS_PER_STEP", 4)
    model = sequential(torch.nn.ReLU())
    watch = nanfuse.NanWatch(model)  # no guard: nothing tells the watch that a step ended
    x, _ = batch(0)
    with pytest.warns(UserWarning, match="no step observed"):
        for _ in range(10):
            model(x).sum().backward()
    assert len(watch._calls) == 4
