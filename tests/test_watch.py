"""NanWatch on hand-built models where the truth is known: the phase, the producing module and the cause."""

import dataclasses

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


def report_after_one_step(model):
    """The watch's report after one guarded training step of `model` on batch(0)."""
    watch, guard = watched(model)
    train_step(model, guard, *batch(0))
    return watch.report()


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
    report = report_after_one_step(model)
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
    report = report_after_one_step(model)
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
    monkeypatch.setattr(_backend, "eager_pytorch_on_cpu", lambda tensor: False)  # the per-call fast paths read too


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


def test_the_replay_leaves_no_hook_on_a_model_argument():
    model = sequential(Divide())
    watch, guard = watched(model)
    x, y = batch(0)
    x.requires_grad_(True)  # an argument from outside the model that takes part in the backward
    train_step(model, guard, x, y)
    assert watch.report().module == "2" and not x._backward_hooks


class FailsWhenReplayed(torch.nn.Module):
    """Makes a NaN the first time, raises the second (the replay): state kept outside the module."""

    calls = []

    def forward(self, x):
        self.calls.append(1)
        if len(self.calls) > 1:
            raise RuntimeError("cannot run twice")
        return x / (x - x)


def test_a_replay_that_raises_says_it_could_not_localise():
    FailsWhenReplayed.calls.clear()
    model = sequential(FailsWhenReplayed())
    report = report_after_one_step(model)
    assert (report.cause, report.module, report.phase) == ("could not localise", None, None)
    assert "RuntimeError: cannot run twice" in report.explanation


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
    for options, error in ((dict(jump_factor="x"), TypeError), (dict(jump_factor=None), TypeError),
                           (dict(copy_inputs="yes"), TypeError), (dict(history=0), ValueError)):
        with pytest.raises(error, match=next(iter(options))):
            nanfuse.NanWatch(model, **options)
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


# The probe's defects (issue 15): each test failed on the code before its fix.

class Residual(torch.nn.Module):
    """`out += x` in the model's own forward, after a hooked module: an in-place op on a hooked output."""

    def __init__(self, middle):
        super().__init__()
        self.first, self.middle, self.last = torch.nn.Linear(6, 6), middle, torch.nn.Linear(6, 4)

    def forward(self, x):
        h = self.first(x)
        out = self.middle(h)
        out += h
        return self.last(out)


@pytest.mark.parametrize("middle, phase, cause", [
    (Divide(), "forward", "unstable activation"),
    (OverflowingLayer(), "backward", "exploding gradients"),
], ids=["forward", "backward"])
@pytest.mark.parametrize("model_kind", ["relu-inplace", "residual-inplace"])
def test_inplace_ops_after_a_hooked_module_do_not_break_the_replay(middle, phase, cause, model_kind):
    torch.manual_seed(0)
    if model_kind == "relu-inplace":
        model = torch.nn.Sequential(torch.nn.Linear(6, 6), middle, torch.nn.ReLU(inplace=True), torch.nn.Linear(6, 4))
        name = "1"
    else:
        model, name = Residual(middle), "middle"
    report = report_after_one_step(model)
    assert (report.phase, report.cause, report.module) == (phase, cause, name), str(report)


class AdditiveMask(torch.nn.Module):
    """An attention-style -inf mask: softmax(scores + mask) is finite."""

    def forward(self, x):
        mask = torch.zeros_like(x)
        mask[:, 0] = float("-inf")
        return torch.softmax(x + mask, -1)


class MaskedScores(torch.nn.Module):
    def forward(self, x):
        return x + torch.where(torch.arange(x.shape[-1]) == 0, float("-inf"), 0.0)


class NanToNum(torch.nn.Module):
    def forward(self, x):
        return torch.nan_to_num(x, 0.0)


def test_an_absorbed_minus_inf_mask_is_not_blamed_for_an_overflow_in_backward():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Sequential(torch.nn.Linear(8, 8), MaskedScores()),
                                AdditiveMask(), OverflowingLayer(), torch.nn.Linear(8, 4))
    report = report_after_one_step(model)
    assert (report.phase, report.cause, report.module) == ("backward", "exploding gradients", "3"), str(report)


class Attend(torch.nn.Module):
    def forward(self, scores, mask):
        return Overflow.apply(torch.softmax(scores + mask, -1))


class MaskedAttention(torch.nn.Module):
    """An additive float mask with -inf given as a model input, into a module whose backward overflows."""

    def __init__(self):
        super().__init__()
        self.first, self.attend, self.last = torch.nn.Linear(6, 8), Attend(), torch.nn.Linear(8, 4)

    def forward(self, x, mask):
        return self.last(self.attend(self.first(x), mask))


def test_a_minus_inf_mask_given_as_input_is_not_bad_input_data():
    torch.manual_seed(0)
    model = MaskedAttention()
    watch, guard = watched(model)
    x, y = batch(0)
    mask = torch.zeros(8, 8)
    mask[:, :3] = float("-inf")
    nanfuse.cross_entropy(model(x, mask), y).backward()
    guard.step()
    report = watch.report()
    assert (report.phase, report.cause, report.module) == ("backward", "exploding gradients", "attend"), str(report)


class MaskedAfterLinear(torch.nn.Module):
    """NaN-coded inputs whose rows are masked out after the first Linear: finite forward, NaN weight gradient."""

    def __init__(self):
        super().__init__()
        self.first, self.last = torch.nn.Linear(6, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        h = self.first(x)
        return self.last(torch.where(torch.isfinite(h), h, 0.0))


def test_a_nan_input_absorbed_in_forward_that_reaches_a_weight_gradient_is_bad_input_data():
    torch.manual_seed(0)
    model = MaskedAfterLinear()
    watch, guard = watched(model)
    x, y = batch(0)
    x[5, 2] = float("nan")
    train_step(model, guard, x, y)
    report = watch.report()
    assert (report.phase, report.cause, report.rows) == ("input", "bad input data", [5]), str(report)
    assert "reached the gradients in `first`" in report.explanation


def test_minus_inf_masked_logits_fed_to_the_loss_are_not_blamed():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), OverflowingLayer(), torch.nn.Linear(8, 4), MaskedScores())
    watch, guard = watched(model)
    x, y = batch(0)
    train_step(model, guard, x, y.clamp(min=1))  # class 0 is masked out, and no target is 0
    report = watch.report()
    assert (report.phase, report.cause, report.module) == ("backward", "exploding gradients", "1"), str(report)


def test_nan_coded_inputs_the_model_cleans_are_not_bad_input_data():
    torch.manual_seed(0)
    model = torch.nn.Sequential(NanToNum(), torch.nn.Linear(6, 8), Divide(), torch.nn.Linear(8, 4))
    watch, guard = watched(model)
    x, y = batch(0)
    x[2, 1] = float("nan")  # a missing value, handled by the model
    train_step(model, guard, x, y)
    report = watch.report()
    assert (report.phase, report.cause, report.module) == ("forward", "unstable activation", "2"), str(report)


class Exp(torch.nn.Module):
    def forward(self, x):
        return torch.exp(x * 1e3)


class Normalize(torch.nn.Module):
    def forward(self, x):
        return x / x.sum(-1, keepdim=True)


def test_a_nan_made_from_an_overflow_names_where_the_inf_started():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), MaskedScores(), Exp(), Normalize(), torch.nn.Linear(8, 4))
    report = report_after_one_step(model)
    assert (report.phase, report.cause, report.module) == ("forward", "unstable activation", "2"), str(report)


class Recurrent(torch.nn.Module):
    """TBPTT: a hidden state kept across steps as an attribute, and noise from its own torch.Generator."""

    def __init__(self):
        super().__init__()
        self.cell, self.head = torch.nn.Linear(6, 6), torch.nn.Linear(6, 4)
        self.hidden = torch.zeros(1, 6)
        self.noise = torch.Generator().manual_seed(5)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        h = torch.tanh(self.cell(x) + self.hidden)
        self.hidden = h.detach().mean(0, keepdim=True)
        return self.head(h + 0.1 * torch.rand(h.shape, generator=self.noise))


def _recurrent_run(with_watch):
    torch.manual_seed(0)
    model = Recurrent()
    if with_watch:
        watch, guard = watched(model)
    else:
        guard = nanfuse.NanGuard(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), max_norm=1.0)
    for step in range(4):
        x, y = batch(step)
        scale = float("nan") if step == 1 else 1.0  # step 1's loss is NaN: skipped, and replayed by the watch
        train_step(model, guard, x, y, lambda out, t: scale * nanfuse.cross_entropy(out, t))
    report = watch.report() if with_watch else None
    return model, report


def test_a_run_with_the_watch_and_a_bad_step_equals_a_run_without():
    (watched_model, report), (plain_model, _) = _recurrent_run(True), _recurrent_run(False)
    assert (report.step, report.cause) == (1, "unstable loss")
    for a, b in zip(watched_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(watched_model.hidden, plain_model.hidden, rtol=0, atol=0)
    assert torch.equal(watched_model.noise.get_state(), plain_model.noise.get_state())
    assert watched_model.calls == plain_model.calls == 4


def test_the_replay_runs_with_the_hidden_state_and_generator_the_step_saw():
    torch.manual_seed(0)
    model = Recurrent()
    watch, guard = watched(model)
    seen = []
    model.head.register_forward_hook(lambda module, args, out: seen.append(args[0].detach().clone()))
    x, y = batch(0)
    train_step(model, guard, x, y, lambda out, t: float("nan") * nanfuse.cross_entropy(out, t))
    assert len(seen) == 2  # the step, and its replay
    torch.testing.assert_close(seen[1], seen[0], rtol=0, atol=0)


class OwnOverflow(torch.nn.Module):
    """The overflow is in this model's own forward code, between two submodules."""

    def __init__(self):
        super().__init__()
        self.first, self.last = torch.nn.Linear(6, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.last(Overflow.apply(self.first(x)))


class KeywordCalls(torch.nn.Module):
    """Submodules called with keyword arguments."""

    def __init__(self):
        super().__init__()
        self.first, self.middle, self.last = torch.nn.Linear(6, 8), OverflowingLayer(), torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.last(input=self.middle(x=self.first(input=x)))


@pytest.mark.parametrize("model_type, module, tensor", [
    (OwnOverflow, "", "gradient it passed to `first`"),
    (KeywordCalls, "middle", "grad_input"),
], ids=["own-code", "keyword-arguments"])
def test_backward_overflow_names_the_right_module(model_type, module, tensor):
    torch.manual_seed(0)
    model = model_type()
    report = report_after_one_step(model)
    assert (report.phase, report.cause, report.module, report.tensor) == ("backward", "exploding gradients", module,
                                                                          tensor), str(report)


class FunctionalUse(torch.nn.Module):
    """A submodule's weight used through F.linear in the model's own code, its gradient overflowing there."""

    def __init__(self):
        super().__init__()
        self.first, self.head = torch.nn.Linear(6, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        return torch.nn.functional.linear(self.first(x), Overflow.apply(self.head.weight), self.head.bias)


def test_overflow_in_the_gradient_of_a_weight_used_functionally_names_the_calling_code():
    torch.manual_seed(0)
    model = FunctionalUse()
    report = report_after_one_step(model)
    assert (report.cause, report.module, report.tensor) == ("exploding gradients", "", "weight.grad"), str(report)


class Cell(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)

    def forward(self, x, h, blow=False):
        out = torch.tanh(self.lin(x) + h)
        return Overflow.apply(out) if blow else out


class Loop(torch.nn.Module):
    """A cell called in a loop, its backward overflowing in one call: the earlier calls only pass it on."""

    def __init__(self):
        super().__init__()
        self.cell, self.head = Cell(), torch.nn.Linear(6, 4)

    def forward(self, x):
        h = torch.zeros_like(x)
        for t in range(4):
            h = self.cell(x, h, blow=t == 2)
        return self.head(h)


def test_a_cell_called_in_a_loop_is_named_for_its_overflowing_call():
    torch.manual_seed(0)
    model = Loop()
    report = report_after_one_step(model)
    assert (report.cause, report.module, report.tensor) == ("exploding gradients", "cell", "grad_input 1"), str(report)


def scaled_step(model, guard, scaler, x, y):
    scaler.scale(nanfuse.cross_entropy(model(x), y)).backward()
    guard.step()
    guard.zero_grad()


class BigBackward(torch.autograd.Function):
    """Identity forward; a backward that multiplies by 1e36: finite unscaled, Inf at a scale of 2**16."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * 1e36


class BigBackwardLayer(torch.nn.Module):
    def forward(self, x):
        return BigBackward.apply(x)


@pytest.mark.parametrize("init_scale, layer, cause", [
    (2.0 ** 16, BigBackwardLayer(), "loss-scale overflow"),
    (1.0, OverflowingLayer(), "exploding gradients"),  # at a scale <= 1 the scaling did not make the overflow
], ids=["scale-2**16", "scale-1"])
def test_grad_scaler_overflow_is_a_loss_scale_overflow(init_scale, layer, cause):
    model = sequential(layer)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    watch = nanfuse.NanWatch(model)
    guard = nanfuse.NanGuard(torch.optim.SGD(model.parameters(), lr=1e-2), scaler=scaler, watch=watch)
    x, y = batch(0)
    scaled_step(model, guard, scaler, x, y)
    report = watch.report()
    assert (report.phase, report.cause, report.module) == ("backward", cause, "2"), str(report)
    if init_scale > 1:
        assert "scale 65536" in report.explanation


def test_grad_scaler_step_with_a_nan_row_is_still_bad_input_data():
    model = sequential(torch.nn.ReLU())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    watch = nanfuse.NanWatch(model)
    guard = nanfuse.NanGuard(torch.optim.SGD(model.parameters(), lr=1e-2), scaler=scaler, watch=watch)
    x, y = batch(0)
    x[4, 0] = float("nan")
    scaled_step(model, guard, scaler, x, y)
    assert (watch.report().cause, watch.report().rows) == ("bad input data", [4])


def test_two_backward_calls_through_one_output_are_both_replayed():
    model = sequential(torch.nn.ReLU())
    watch, guard = watched(model)
    x, y = batch(0)
    out = model(x)
    (out * float("nan")).sum().backward(retain_graph=True)  # the first loss is the bad one
    nanfuse.cross_entropy(out, y).backward()
    guard.step()
    report = watch.report()
    assert (report.phase, report.cause) == ("loss", "unstable loss"), str(report)


@dataclasses.dataclass
class Batch:
    features: torch.Tensor
    scale: torch.Tensor


@dataclasses.dataclass
class Output:
    logits: torch.Tensor


class DataclassModel(torch.nn.Module):
    def __init__(self, middle):
        super().__init__()
        self.body = sequential(middle)

    def forward(self, batch):
        return Output(logits=self.body(batch.features * batch.scale))


@pytest.mark.parametrize("cause", ["bad input data", "unstable loss"])
def test_dataclass_batches_and_outputs_are_walked(cause):
    model = DataclassModel(torch.nn.ReLU())
    watch, guard = watched(model)
    x, y = batch(0)
    if cause == "bad input data":
        x[6, 3] = float("inf")
    loss = nanfuse.cross_entropy(model(Batch(x, torch.ones(8, 1))).logits, y)
    (loss if cause == "bad input data" else loss * float("nan")).backward()  # the NaN gradient of the output
    guard.step()
    report = watch.report()
    assert report.cause == cause, str(report)
    if cause == "bad input data":
        assert (report.tensor, report.rows) == ("input `batch.features`", [6])
    else:
        assert report.tensor == "gradient arriving at output"


def test_gradient_accumulation_reports_the_call_and_its_rows():
    model = sequential(torch.nn.ReLU())
    watch, guard = watched(model)
    for call in range(3):
        x, y = batch(call, n=4)
        if call == 1:
            x[2, 5] = float("nan")
        (nanfuse.cross_entropy(model(x), y) / 3).backward()
    guard.step()
    report = watch.report()
    assert (report.cause, report.call, report.rows) == ("bad input data", 1, [2])
    assert "dim 0 of call 1" in str(report)


class SequenceFirst(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.head = torch.nn.GRU(6, 8), torch.nn.Linear(8, 4)

    def forward(self, x):  # x: (length, batch, features)
        return self.head(self.rnn(x)[0][-1])


def test_sequence_first_inputs_report_rows_along_sample_dim():
    torch.manual_seed(0)
    model = SequenceFirst()
    watch, guard = watched(model, sample_dim=1)
    x = torch.randn(5, 8, 6)
    x[3, 6, 0] = float("nan")
    train_step(model, guard, x, batch(0)[1])
    report = watch.report()
    assert (report.cause, report.rows, report.sample_dim) == ("bad input data", [6], 1)


def test_host_and_device_norm_histories_take_the_same_median(monkeypatch):
    from nanfuse.watch import lower_median

    values = [3.0, 1.0, 4.0, 2.0]
    assert lower_median(values) == torch.tensor(values).nanmedian().item() == 2.0
    medians = []
    for deferred in (False, True):
        with monkeypatch.context() as patch:
            if deferred:
                defer_reads(patch)
            model = sequential(torch.nn.ReLU())
            watch, guard = watched(model, min_history=4)
            for step in range(4):  # an even count: the two definitions of a median differ
                train_step(model, guard, *batch(step))
            train_step(model, guard, *batch(4), lambda out, t: 1e4 * nanfuse.cross_entropy(out, t))
            medians.append(watch.report().numbers["median"])
    assert medians[0] == pytest.approx(medians[1], rel=1e-12)


def test_replays_waiting_for_report_stay_bounded(monkeypatch):
    from nanfuse import watch as watch_module

    monkeypatch.setattr(watch_module, "MAX_REPLAYS", 4)
    model = sequential(Divide())
    watch, guard = watched(model)
    for step in range(10):
        train_step(model, guard, *batch(step))
        assert len(watch._replays) <= 4
    causes = [(r.step, r.cause) for r in watch.reports()]
    assert causes == [(s, "not kept" if 2 <= s < 8 else "unstable activation") for s in range(10)]


def test_rng_state_is_captured_for_the_devices_of_the_parameters(monkeypatch):
    from nanfuse.watch import _cuda_devices

    class Stub:
        def __init__(self, device):
            self.device = torch.device(device)

    model = sequential(torch.nn.ReLU())
    monkeypatch.setattr(model, "parameters", lambda: iter([Stub("cuda:1"), Stub("cpu")]))
    assert _cuda_devices(model, [torch.zeros(1), Stub("cuda:0")]) == {0, 1}


class RunningMean(torch.nn.Module):
    """A registered buffer reassigned (not changed in place) by each call, and a list the forward appends to."""

    def __init__(self):
        super().__init__()
        self.first, self.head = torch.nn.Linear(6, 8), torch.nn.Linear(8, 4)
        self.register_buffer("mean", torch.zeros(6))
        self.sizes = []

    def forward(self, x):
        self.mean = 0.9 * self.mean + 0.1 * x.detach().nan_to_num().mean(0)
        self.sizes.append(x.shape[0])
        return self.head(torch.tanh(self.first(x - self.mean)))


def _running_mean_run(with_watch, seen=None):
    torch.manual_seed(0)
    model = RunningMean()
    if seen is not None:
        model.head.register_forward_hook(lambda module, args, out: seen.append(args[0].detach().clone()))
    if with_watch:
        watch, guard = watched(model)
    else:
        guard = nanfuse.NanGuard(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), max_norm=1.0)
    for step in range(4):
        x, y = batch(step)
        if step == 1:
            x[3, 2] = float("nan")
        train_step(model, guard, x, y)
    return model, watch.report() if with_watch else None


def test_a_reassigned_buffer_and_an_appended_list_are_put_back_after_a_replay():
    (watched_model, report), (plain_model, _) = _running_mean_run(True), _running_mean_run(False)
    assert (report.step, report.cause, report.rows) == (1, "bad input data", [3])
    torch.testing.assert_close(watched_model.mean, plain_model.mean, rtol=0, atol=0)
    assert watched_model.sizes == plain_model.sizes == [8] * 4
    for a, b in zip(watched_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_replay_sees_a_reassigned_buffer_as_the_step_did():
    seen = []
    _running_mean_run(True, seen)
    assert len(seen) == 5  # four steps and step 1's replay
    torch.testing.assert_close(seen[2], seen[1], rtol=0, atol=0, equal_nan=True)


class AuxiliaryOutput(torch.nn.Module):
    """Two outputs; the second (a NaN/Inf diagnostic) never reaches the loss."""

    def __init__(self, aux):
        super().__init__()
        self.head, self.aux, self.kind = torch.nn.Linear(6, 4), torch.nn.Linear(6, 1), aux

    def forward(self, x):
        aux = self.aux(x)
        return self.head(x), torch.log(aux) if self.kind == "nan" else aux * 1e30 * 1e30


@pytest.mark.parametrize("aux", ["nan", "inf"])
def test_a_non_finite_output_the_loss_does_not_use_is_not_blamed(aux):
    torch.manual_seed(0)
    model = AuxiliaryOutput(aux)
    watch, guard = watched(model)
    x, y = batch(0)
    logits = model(x)[0] * 1000  # finite logits; -log(softmax) of a saturated row is the bad step's cause
    (-torch.log(torch.softmax(logits, 1)).gather(1, y[:, None]).mean()).backward()
    guard.step()
    report = watch.report()
    assert (report.phase, report.cause) == ("loss", "unstable loss"), str(report)


def test_a_minus_inf_input_row_that_reaches_a_weight_gradient_is_bad_input_data():
    model = sequential(torch.nn.ReLU())  # Linear, Tanh: the forward absorbs the -inf, the weight gradient does not
    watch, guard = watched(model)
    x, y = batch(0)
    x[4, 1] = float("-inf")
    train_step(model, guard, x, y)
    report = watch.report()
    assert (report.phase, report.cause, report.rows) == ("input", "bad input data", [4]), str(report)


def test_a_nan_target_of_a_float_loss_is_an_unstable_loss_with_its_rows():
    model = sequential(torch.nn.ReLU())
    watch, guard = watched(model)
    x, _ = batch(0)
    target = torch.randn(8, 4)
    target[5, 1] = float("nan")  # the watch sees the model's arguments only, not the loss's target
    train_step(model, guard, x, target, torch.nn.functional.mse_loss)
    report = watch.report()
    assert (report.phase, report.cause, report.rows) == ("loss", "unstable loss", [5]), str(report)
    assert "target" in report.explanation


def test_a_weight_already_non_finite_is_named_in_the_report():
    model = sequential(torch.nn.Linear(8, 8))
    with torch.no_grad():
        model[2].weight[1, 1] = float("nan")  # as loaded from a corrupt checkpoint
    report = report_after_one_step(model)
    assert (report.phase, report.cause, report.module) == ("forward", "unstable activation", "2"), str(report)
    assert "its parameter `weight` already holds 1 NaN/Inf" in report.explanation


def test_host_and_device_histories_agree_after_a_skipped_step(monkeypatch):
    # the history holds the latest `history` finite norms on both: a skipped step must not keep an older one alive
    scales = [100.0, 1.0, 100.0, 1.0, float("nan"), 100.0, 1e5]
    jumps = []
    for deferred in (False, True):
        with monkeypatch.context() as patch:
            if deferred:
                defer_reads(patch)
            model = sequential(torch.nn.ReLU())
            watch, guard = watched(model, history=4, min_history=4, keep=8)
            for step, scale in enumerate(scales):
                train_step(model, guard, *batch(0), lambda out, t, s=scale: s * nanfuse.cross_entropy(out, t))
            jumps.append([(r.step, round(r.numbers["median"], 3)) for r in watch.reports() if r.numbers])
    assert jumps[0] == jumps[1] and [step for step, _ in jumps[0]] == [6], jumps


class LossInForward(torch.nn.Module):
    """Hugging Face style: given labels, the forward computes the loss and returns it with the logits."""

    def __init__(self, logits_scale, divide=False):
        super().__init__()
        self.body, self.scale, self.divide = torch.nn.Linear(6, 4), logits_scale, divide

    def forward(self, x, labels):
        logits = self.body(x) * self.scale
        if self.divide:
            logits = logits / (logits - logits)
        loss = -torch.log(torch.softmax(logits, 1)).gather(1, labels[:, None]).mean()
        return {"loss": loss, "logits": logits}


@pytest.mark.parametrize("divide", [False, True], ids=["saturated-loss", "nan-logits"])
def test_a_loss_computed_in_the_forward_is_an_unstable_loss_when_the_logits_are_finite(divide):
    torch.manual_seed(0)
    model = LossInForward(1000.0, divide)
    watch, guard = watched(model)
    x, y = batch(0)
    model(x, y)["loss"].backward()
    guard.step()
    report = watch.report()
    expected = ("forward", "unstable activation") if divide else ("loss", "unstable loss")
    assert (report.phase, report.cause, report.module) == (*expected, ""), str(report)


def _two_guards(bad_step, steps):
    model = sequential(torch.nn.ReLU())
    model.register_parameter("tiny", torch.nn.Parameter(torch.zeros(1)))  # a group with ~1e4x smaller gradients
    watch = nanfuse.NanWatch(model)
    guards = [nanfuse.NanGuard(torch.optim.AdamW(params, lr=1e-3, fused=True), max_norm=1.0, watch=watch)
              for params in (list(model.parameters())[:-1], [model.tiny])]
    for step in range(steps):
        x, y = batch(step)
        if step == bad_step:
            x[2, 3] = float("nan")
        (nanfuse.cross_entropy(model(x), y) + 1e-4 * model.tiny.sum()).backward()
        for guard in guards:
            guard.step()
            guard.zero_grad()
    return watch


@pytest.mark.parametrize("deferred", [False, True], ids=["read-at-once", "device-history"])
def test_two_guards_sharing_a_watch_count_each_step_once_with_a_norm_history_each(deferred, monkeypatch):
    if deferred:
        defer_reads(monkeypatch)
    watch = _two_guards(None, 12)  # clean: mixing the two norm histories made false jumps
    assert watch.steps == 12 and watch.reports() == []
    watch = _two_guards(1, 3)
    report = watch.report()  # the latest: the second guard's view of step 1 is that step, not "not reproduced"
    assert (report.step, report.cause, report.rows) == (1, "bad input data", [2]), str(report)
    assert [r.step for r in watch.reports()] == [1]


def test_one_guard_stepping_without_a_model_call_starts_a_new_step_each_time():
    model = sequential(torch.nn.ReLU())
    watch, guard = watched(model)
    train_step(model, guard, *batch(0))
    for _ in range(2):  # gradients set by hand, no call of the model: still one step per guard.step()
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        guard.step()
    assert watch.steps == guard.steps == 3
