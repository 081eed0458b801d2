"""NanGuard: a NaN step is skipped with parameters and optimizer state bit-for-bit unchanged."""

import copy
import gc
import io
import pickle
import sys
import threading

import pytest
import torch
from helpers import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

import nanfuse
from nanfuse._backend import uses_triton
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


class GradientOps(TorchDispatchMode):
    """Names of the ops that read or write any of the given gradient tensors, one per pass over them,
    leaving out those of the optimizer's own step (the same on both sides)."""

    def __init__(self, grads, optimizer):
        super().__init__()
        self.ptrs, self.ops, self.in_step = {g.data_ptr() for g in grads}, [], False
        step = optimizer.step

        def unrecorded_step(*args, **kwargs):
            self.in_step = True
            try:
                return step(*args, **kwargs)
            finally:
                self.in_step = False

        self.unrecorded_step = unrecorded_step

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        touches = any(isinstance(a, torch.Tensor) and a.numel() > 1 and a.data_ptr() in self.ptrs for a in flat)
        if touches and not self.in_step:
            self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


SCALER_OPTIMIZERS = {
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adamw-fused": lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True),
}


@pytest.mark.parametrize("name", SCALER_OPTIMIZERS)
def test_grad_scaler_evolves_as_with_pytorch(name):
    # PyTorch's recipe: scaler.unscale_ -> clip_grad_norm_ -> scaler.step -> scaler.update, one pass each.
    # The guard reads the scaled gradients once and scales them (at most) once, and the scaler's scale and
    # growth tracker (GradScaler private attributes the guard drives: this test pins them) stay identical.
    ours, theirs = make_model(), make_model()
    theirs.load_state_dict(ours.state_dict())
    opt_ours, opt_theirs = SCALER_OPTIMIZERS[name](ours.parameters()), SCALER_OPTIMIZERS[name](theirs.parameters())
    scaler_ours, scaler_theirs = (torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
                                  for _ in range(2))
    guard = nanfuse.NanGuard(opt_ours, max_norm=0.5, scaler=scaler_ours)
    for step in range(7):
        x, y = batch(step)
        for model, scaler in ((ours, scaler_ours), (theirs, scaler_theirs)):
            scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
            if step == 3:  # an overflow: both skip and back off
                model[2].bias.grad[0] = float("inf")
        ours_trace = GradientOps([p.grad for p in ours.parameters()], opt_ours)
        theirs_trace = GradientOps([p.grad for p in theirs.parameters()], opt_theirs)
        opt_ours.step, opt_theirs.step = ours_trace.unrecorded_step, theirs_trace.unrecorded_step
        with ours_trace:
            report = guard.step()
        with theirs_trace:
            scaler_theirs.unscale_(opt_theirs)
            norm = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.5)
            scaler_theirs.step(opt_theirs)
            scaler_theirs.update()
        assert torch.equal(scaler_ours._scale, scaler_theirs._scale), step
        assert torch.equal(scaler_ours._growth_tracker, scaler_theirs._growth_tracker), step
        assert report.found_inf.item() == (1.0 if step == 3 else 0.0)
        if step != 3:
            assert_close(report.total_norm, norm.double(), torch.float32, "norm of the unscaled gradients")
        # PyTorch-path passes are aten ops (the kernels read through pointer tables: test_clip counts launches);
        # on CPU a non-finite tensor is looked at again, by itself, to count its NaN/Inf
        if step != 3 and not uses_triton(x):
            passes, theirs_passes = ours_trace.ops, theirs_trace.ops
            assert len(passes) == (1 if "fused" in name else 2) < len(theirs_passes) == 3, (passes, theirs_passes)
        for a, b in zip(ours.parameters(), theirs.parameters()):
            assert_close(a, b.double(), torch.float32, f"parameter after step {step}")
        guard.zero_grad()
        opt_theirs.zero_grad()
    assert scaler_ours.get_scale() != 2.0**12  # the scale both backed off and grew during the run
    assert guard.skipped_steps.item() == 1


def test_grad_scaler_unscaled_twice_is_an_error():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    guard = nanfuse.NanGuard(optimizer, max_norm=1.0, scaler=scaler)
    x, y = batch(0)
    scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
    scaler.unscale_(optimizer)
    with pytest.raises(RuntimeError, match="NanGuard unscales the gradients itself"):
        guard.step()


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
    monkeypatch.setattr(sys.modules["nanfuse.guard"], "_nothing_but_the_step", lambda report: False)
    model = make_model()
    guard = nanfuse.NanGuard(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), max_norm=1.0)
    for step in range(3):
        x, y = batch(step)
        nanfuse.cross_entropy(model(x), y).backward()
        if step == 2:
            model[0].weight.grad[0, 0] = float("nan")
        with HostReads() as trace:
            guard.step()
        # the first step creates the optimizer's state: it reads the flag once (PyTorch would create the
        # state even for a skipped step); every later step reads nothing
        assert len(trace.reads) == (1 if step == 0 else 0), (step, trace.reads)
        guard.zero_grad()
    assert guard.skipped_steps.item() == 1


def fused_guard(max_norm=1.0):
    model = make_model()
    return model, nanfuse.NanGuard(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), max_norm=max_norm)


def params_of(guard):
    return [p for group in guard.optimizer.param_groups for p in group["params"]]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_guard_steps_its_own_optimizer(how):
    # issue 11 item 6: a copy kept the original's optimizer key, so under torch.compile it stepped the
    # original's optimizer, and failed with KeyError once the original was collected
    model, guard = fused_guard()
    copied = copy.deepcopy(guard) if how == "deepcopy" else pickle.loads(pickle.dumps(guard))
    original_before = [p.detach().clone() for p in params_of(guard)]
    del guard
    gc.collect()
    for p in params_of(copied):
        p.grad = torch.randn_like(p)
    copy_before = [p.detach().clone() for p in params_of(copied)]
    with nanfuse._backend.registered_ops():  # the path torch.compile(guard.step) takes
        copied.step()
    assert all(not torch.equal(a, p) for a, p in zip(copy_before, params_of(copied)))
    assert all(torch.equal(a, p) for a, p in zip(original_before, model.parameters()))


def test_guards_in_threads_train_as_alone():
    # issue 11 item 10: two threads, each with its own model and guard, on the run's backend
    start = make_model()

    def train(results, key):
        model = copy.deepcopy(start)  # the global RNG is no place for threads: every run starts from one model
        guard = nanfuse.NanGuard(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), max_norm=1.0)
        for step in range(4):
            x, y = batch(step)
            # F.cross_entropy: the Triton interpreter runs one kernel at a time, and only the clip's launches
            # hold the lock that serializes them (compiled kernels need none)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if step == 1:
                model[0].weight.grad[0, 0] = float("nan")
            guard.step()
            guard.zero_grad()
        results[key] = ([p.detach().clone() for p in model.parameters()], guard.skipped_steps.item())

    alone, together = {}, {}
    train(alone, 0)
    threads = [threading.Thread(target=train, args=(together, k)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for key in (0, 1):
        assert together[key][1] == alone[0][1] == 1
        assert all(torch.equal(a, b) for a, b in zip(together[key][0], alone[0][0]))


def three_steps_one_bad(model, stepper, bad_step, value):
    """Three training steps of `stepper` (a guard or a guarded optimizer) on `model`, step `bad_step` with one
    gradient value set to `value`."""
    for step in range(3):
        x, y = batch(step)
        nanfuse.cross_entropy(model(x), y).backward()
        if step == bad_step:
            model[0].bias.grad[0] = value
        stepper.step()
        stepper.zero_grad()


def test_guard_state_round_trips_through_torch_save():
    # issue 11 item 12: the README says state_dict() saves last_norm; it did not
    model, guard = fused_guard()
    three_steps_one_bad(model, guard, 2, float("inf"))
    buffer = io.BytesIO()
    torch.save(guard.state_dict(), buffer)
    buffer.seek(0)
    _, restored = fused_guard()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.steps == 3 and restored.skipped_steps.item() == 1
    assert torch.equal(restored.last_norm, guard.last_norm) and restored.last_norm.item() == float("inf")
    for ours, theirs in zip(restored.last_report, guard.last_report):
        assert torch.equal(ours, theirs)


def test_guarded_optimizer_copies_pickles_and_saves_the_guard():
    # issue 11 item 12: GuardedOptimizer failed deepcopy and pickle (AttributeError: optimizer), and its
    # state_dict() dropped the skipped-step counter
    from nanfuse.integrations.transformers import GuardedOptimizer

    model = make_model()
    optimizer = GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True), max_norm=1.0)
    three_steps_one_bad(model, optimizer, 1, float("nan"))
    for copied in (copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))):
        assert copied.guard.optimizer is copied.optimizer and copied.optimizer is not optimizer.optimizer
        assert copied.skipped_steps.item() == 1 and copied.guard.steps == 3
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    fresh_model = make_model()
    restored = GuardedOptimizer(torch.optim.AdamW(fresh_model.parameters(), lr=1e-2, fused=True), max_norm=1.0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.skipped_steps.item() == 1 and restored.guard.steps == 3
    assert torch.equal(restored.guard.last_norm, optimizer.guard.last_norm)
    saved, loaded = optimizer.optimizer.state_dict()["state"], restored.optimizer.state_dict()["state"]
    assert all(torch.equal(saved[k][f], loaded[k][f]) for k in saved for f in saved[k])
    restored.load_state_dict(optimizer.optimizer.state_dict())  # a plain optimizer's state dict loads too


@pytest.mark.parametrize("make, error, name", [
    (lambda p: nanfuse.NanGuard([p]), TypeError, "optimizer"),
    (lambda p: nanfuse.NanGuard(torch.optim.SGD([p], lr=0.1), norm_type=-1), ValueError, "norm_type"),
    (lambda p: nanfuse.NanGuard(torch.optim.SGD([p], lr=0.1), norm_type="l2"), ValueError, "norm_type"),
    (lambda p: nanfuse.NanGuard(torch.optim.SGD([p], lr=0.1), max_norm=float("nan")), ValueError, "max_norm"),
    (lambda p: nanfuse.NanGuard(torch.optim.SGD([p], lr=0.1), scaler=object()), TypeError, "scaler"),
    (lambda p: nanfuse.NanGuard(torch.optim.SparseAdam([p])), ValueError, "optimizer"),
    (lambda p: nanfuse.NanGuard(torch.optim.LBFGS([p]), scaler=torch.amp.GradScaler("cpu")), ValueError, "scaler"),
])
def test_bad_arguments_fail_at_construction_naming_them(make, error, name):
    # issue 11 item 13: NanGuard([tensor]) said "cannot create weak reference to 'list' object";
    # norm_type=-1 was accepted and failed at step()
    with pytest.raises(error, match=name):
        make(torch.nn.Parameter(torch.randn(3)))


@pytest.mark.parametrize("state, name", [({"skipped_steps": 1}, "steps"), ({"steps": 2}, "skipped_steps"),
                                         ({"steps": -1, "skipped_steps": 0}, "steps"),
                                         ({"steps": 1, "skipped_steps": 0.5}, "skipped_steps"),
                                         ({"steps": 1.5, "skipped_steps": 0}, "steps"),
                                         ({"steps": "3", "skipped_steps": 0}, "steps"),
                                         ({"steps": 1, "skipped_steps": -1}, "skipped_steps"),
                                         ({"steps": 1, "skipped_steps": torch.tensor(-2)}, "skipped_steps"),
                                         ({"steps": 1, "skipped_steps": 0, "last_report": dict(
                                             total_norm="big", clip_coef=1.0, found_inf=0.0, nonfinite_count=0)},
                                          "total_norm"),
                                         ([1, 2], "state_dict")])
def test_bad_state_dicts_fail_naming_the_key(state, name):
    # issue 11 item 13: load_state_dict({"skipped_steps": 1}) raised AttributeError: 'int' object has no 'clone'
    _, guard = fused_guard()
    with pytest.raises(ValueError, match=name):
        guard.load_state_dict(state)
    guard.load_state_dict({"steps": 4, "skipped_steps": 2})  # ints are fine; last_report optional
    assert guard.steps == 4 and guard.skipped_steps.item() == 2 and guard.last_norm is None
    guard.load_state_dict({"steps": 5.0, "skipped_steps": torch.tensor(3)})  # integral numbers too
    assert guard.steps == 5 and guard.skipped_steps.item() == 3


@pytest.mark.parametrize("name", ["sgd-fused", "adam-fused"])
def test_a_state_entry_read_before_the_first_step_does_not_hide_it(name):
    # issue 11 follow-up 3: reading optimizer.state[p] before training creates an empty entry; the guard then
    # took the first step for one that creates no state, and a skipped first step left a NaN momentum buffer
    model = make_model()
    optimizer = OPTIMIZERS[name](model.parameters())
    guard = nanfuse.NanGuard(optimizer, max_norm=1.0)
    for p in model.parameters():
        assert not optimizer.state[p]  # a defaultdict: an empty entry per parameter
    x, y = batch(0)
    nanfuse.cross_entropy(model(x), y).backward()
    model[0].bias.grad[0] = float("nan")
    guard.step()
    assert guard.skipped_steps.item() == 1
    assert all(not state for state in optimizer.state.values()), "a skipped first step created state"
    guard.zero_grad()
    for step in (1, 2):
        x, y = batch(step)
        nanfuse.cross_entropy(model(x), y).backward()
        guard.step()
        guard.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def shared_scaler_run(theirs):
    """Two models and optimizers, one GradScaler, the loss of both in one backward: PyTorch's multi-optimizer
    AMP recipe (scaler.step(o1); scaler.step(o2); scaler.update()) or two guards; (parameters, scales)."""
    torch.manual_seed(0)
    models = [make_model(), make_model()]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    guards = [nanfuse.NanGuard(o, max_norm=0.5, scaler=scaler, update_scaler=False) for o in optimizers]
    scales = []
    for step in range(6):
        x, y = batch(step)
        scaler.scale(sum(torch.nn.functional.cross_entropy(m(x), y) for m in models)).backward()
        if step == 3:  # an overflow in the second model only: both optimizers skip, the scale backs off once
            models[1][2].bias.grad[0] = float("inf")
        if theirs:
            for model, optimizer in zip(models, optimizers):
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            for optimizer in optimizers:
                scaler.step(optimizer)
        else:
            for guard in guards:
                guard.step()
        scaler.update()
        scales.append(scaler.get_scale())
        for optimizer in optimizers:
            optimizer.zero_grad()
    return [p.detach() for m in models for p in m.parameters()], scales


def test_guards_sharing_a_grad_scaler_evolve_it_as_pytorch():
    # issue 11 follow-up 4: each guard called scaler.update(): the second optimizer was unscaled with the
    # already-changed scale and the scale grew twice per iteration
    ours, our_scales = shared_scaler_run(theirs=False)
    theirs, their_scales = shared_scaler_run(theirs=True)
    assert our_scales == their_scales
    for a, b in zip(ours, theirs):
        assert_close(a, b.double(), torch.float32, "parameter")
    model = make_model()
    scaler = torch.amp.GradScaler("cpu")
    first = nanfuse.NanGuard(torch.optim.SGD(model[0].parameters(), lr=0.1), scaler=scaler)
    with pytest.raises(ValueError, match="update_scaler=False"):  # a second guard updating the same scaler
        nanfuse.NanGuard(torch.optim.SGD(model[2].parameters(), lr=0.1), scaler=scaler)
    assert first.update_scaler
    from nanfuse.integrations.transformers import GuardedOptimizer

    second = GuardedOptimizer(torch.optim.SGD(model[2].parameters(), lr=0.1), scaler=scaler, update_scaler=False)
    assert not second.guard.update_scaler  # GuardedOptimizer passes it on
