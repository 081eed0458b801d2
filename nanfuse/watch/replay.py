"""Replay one captured model call with hooks on every submodule, counting the NaN, +Inf and -Inf values of every
module's inputs, outputs, grad_outputs and grad_inputs and of every parameter gradient, as device tensors.

Runs only for a step already known to be bad (or a gradient-norm jump), so per-tensor checks are fine here.
Forward values are counted when each hook fires, before any later in-place op can change them; the backward
is watched through tensor hooks on each module's inputs and outputs (not full backward hooks, which refuse
in-place ops on those tensors), so keyword arguments are covered too. The replay runs under the captured RNG
states (the default generators and the torch.Generator attributes of the model's modules) and with the
module tensor attributes the call saw (a recurrent state kept across steps), and puts back everything it
touches: those states, every module attribute's binding (tensors, counters), the tensor attributes' and the
buffers' values; gradients come from torch.autograd.grad, so
no .grad changes.
"""

import collections
import contextlib
import copy
import dataclasses
import inspect

import torch

from .tree import named_tensors, tensors


@dataclasses.dataclass
class Capture:
    """What one call of the watched model needs to be replayed; tensors are kept by reference."""
    args: tuple
    kwargs: dict
    cpu_rng: torch.Tensor
    cuda_rng: dict  # device index -> generator state
    autocast: tuple  # (device type, enabled, dtype) for cpu and cuda
    attributes: list  # (module, name, tensor): the tensor attributes of the model's modules at the call
    generators: list  # (generator, state): torch.Generator attributes of the model's modules at the call
    output_grads: dict = dataclasses.field(default_factory=dict)  # output leaf index -> gradient arriving there


_PLAIN = frozenset({dict, collections.OrderedDict, bool, int, float, str, type(None), list, tuple, set})
_CONTAINERS = frozenset({dict, collections.OrderedDict, list, set})  # their contents are put back after a replay


def module_state(model):
    """(tensor attributes, generator attributes) of the model's modules: [(module, name, value)] each."""
    found, generators = [], []
    for module in model.modules():
        # registered buffers too, by reference: one reassigned by each call (a running mean kept as
        # `self.mean = ...`) is seen by the replay as the step saw it
        found += [(module, name, value) for name, value in module._buffers.items() if value is not None]
        for name, value in vars(module).items():
            if type(value) in _PLAIN:  # most of a module's attributes: skipped without an isinstance check
                continue
            if isinstance(value, torch.Tensor):
                found.append((module, name, value))
            elif isinstance(value, torch.Generator):
                generators.append((module, name, value))
    return found, generators


def _float_leaves(tree):
    return [t for t in tensors(tree) if t.is_floating_point()]


class Slots:
    """Device values (NaN/+Inf/-Inf counts, bad-row masks, norms) gathered during a replay, read in one go."""

    def __init__(self):
        self.values, self.labels = [], []

    def add(self, value, label):
        self.values.append(value.detach().double().reshape(-1))
        self.labels.append(label)
        return len(self.values) - 1

    def count(self, tensors, names):
        """One slot per tensor holding its (NaN, +Inf, -Inf) counts."""
        slots = []
        for t, name in zip(tensors, names):
            t = t.detach()
            slots.append(self.add(torch.stack([t.isnan().sum(), t.isposinf().sum(), t.isneginf().sum()]), name))
        return slots


def _names(prefix, tensors):
    return [prefix] if len(tensors) == 1 else [f"{prefix} {i}" for i in range(len(tensors))]


def _argument_names(model, args, kwargs):
    """(tensor, 'input `name`') for the float tensors among the model's call arguments."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        bound = {f"args[{i}]": a for i, a in enumerate(args)} | kwargs
    named = []
    for name, value in bound.items():
        named += [(t, f"input `{name}{path}`") for path, t in named_tensors(value) if t.is_floating_point()]
    return named


@contextlib.contextmanager
def _as_captured(model, capture):
    """Run under the captured RNG, autocast and module states; put back everything afterwards."""
    cpu_rng = torch.get_rng_state()
    cuda_rng = {i: torch.cuda.get_rng_state(i) for i in capture.cuda_rng}
    attributes, generators = module_state(model)
    bindings = [(module, dict(vars(module))) for module in model.modules()]  # every attribute (a step counter)
    # and the contents of its containers, one level deep: the registered buffers, parameters and submodules (a
    # buffer reassigned by the forward is rebound there) and a list, dict or set the forward adds to
    contents = [(value, copy.copy(value)) for _, names in bindings for value in names.values()
                if type(value) in _CONTAINERS]
    # copied back afterwards; a tensor of the real step's graph only if the replay changed it in place (its version
    # moved), so that step's backward still finds it unchanged (BatchNorm's running statistics keep their version)
    saved = [(t, None if t.requires_grad else -1, t.detach().clone())
             for t in [*model.buffers(), *(v for _, _, v in attributes)]]
    saved = [(t, t._version if version is None else version, value) for t, version, value in saved]
    saved_generators = [(generator, generator.get_state()) for _, _, generator in generators]
    torch.set_rng_state(capture.cpu_rng)
    for i, state in capture.cuda_rng.items():
        torch.cuda.set_rng_state(state, i)
    for generator, state in capture.generators:
        generator.set_state(state)
    for module, name, value in capture.attributes:
        setattr(module, name, value)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            for device_type, enabled, dtype in capture.autocast:
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
            yield
    finally:
        torch.set_rng_state(cpu_rng)
        for i, state in cuda_rng.items():
            torch.cuda.set_rng_state(state, i)
        for generator, state in saved_generators:
            generator.set_state(state)
        for module, names in bindings:
            vars(module).clear()
            vars(module).update(names)
        for value, saved_value in contents:
            value.clear()
            if isinstance(value, list):
                value.extend(saved_value)
            else:
                value.update(saved_value)
        with torch.no_grad():
            for tensor, version, value in saved:
                if version < 0 or tensor._version != version:
                    tensor.copy_(value)


@dataclasses.dataclass
class Replay:
    """The slots of one replayed call and how they are grouped (all indices into slots.values)."""
    slots: Slots
    call: int  # which call of the model in its step (gradient accumulation makes several)
    inputs: list  # (slot, rows slot) per float input of the model call
    forward: list  # (module name, input slots, output slots) in completion order
    outputs: list  # slots of the model's float outputs that a gradient came back to (all of them if none did)
    output_grads: list  # slots of the gradients arriving at the model's outputs
    calls: list  # (module name, the call it was made in or None): every module call of the forward, as started
    backward: list  # (order, call, "in" or "out", slot): gradients at module call inputs and outputs, as fired
    params: dict  # module name -> [(slot, 'name.grad')] for its own parameters
    norms: list  # (slot, parameter name): gradient norm of each parameter
    error: str | None = None
    output_grad_rows: list = dataclasses.field(default_factory=list)  # rows slot (or None) per output_grads slot
    param_values: dict = dataclasses.field(default_factory=dict)  # module name -> [(slot, name)]: its parameters
    scalar_outputs: list = dataclasses.field(default_factory=list)  # the slots of `outputs` that are 0-dim
    other_outputs: list = dataclasses.field(default_factory=list)  # slots of the float outputs not in `outputs`
    sample_dim: int = 0  # the dim of the inputs whose bad entries are reported as rows


def _rows(t, sample_dim):
    """Per-sample bool mask (along sample_dim) of the samples holding a non-finite value; None if none fits."""
    if t.dim() <= sample_dim or not t.numel():
        return None
    return (~torch.isfinite(t.detach())).movedim(sample_dim, 0).reshape(t.shape[sample_dim], -1).any(1)


def replay(model, capture, call=0, sample_dim=0):
    """Run the captured call again with hooks on, then its backward from the captured output gradients."""
    slots = Slots()
    record = Replay(slots, call, [], [], [], [], [], [], {}, [], sample_dim=sample_dim)
    open_calls, handles = [], []

    def grad_hook(call, side, label):
        def hook(grad):
            record.backward.append((len(record.backward), call, side, slots.count([grad], [label])[0]))
        return hook

    def watch_grads(call, side, tensors, prefix):
        for t, label in zip(tensors, _names(prefix, tensors)):
            if t.requires_grad:  # removed afterwards: a tensor from outside the replay (an argument) keeps none
                handles.append(t.register_hook(grad_hook(call, side, label)))

    def pre_hook(name):
        def hook(module, args, kwargs):
            tensors = _float_leaves((args, kwargs))
            call = len(record.calls)  # one per call: a module called in a loop (a recurrent cell) has several
            record.calls.append((name, open_calls[-1][0] if open_calls else None))
            open_calls.append((call, slots.count(tensors, _names(f"{name or 'model'} input", tensors))))
            watch_grads(call, "in", tensors, "grad_input")
        return hook

    def post_hook(name):
        def hook(module, args, kwargs, output):
            tensors = _float_leaves(output)
            call, ins = open_calls.pop()
            record.forward.append((name, ins, slots.count(tensors, _names("output", tensors))))
            watch_grads(call, "out", tensors, "grad_output")
        return hook

    for t, label in _argument_names(model, capture.args, capture.kwargs):
        rows = _rows(t, sample_dim)
        record.inputs.append((slots.count([t], [label])[0], None if rows is None else slots.add(rows, label)))
    try:
        for name, module in model.named_modules():
            handles += [module.register_forward_pre_hook(pre_hook(name), with_kwargs=True),
                        module.register_forward_hook(post_hook(name), with_kwargs=True)]
        params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        for name, p in model.named_parameters():  # a weight already non-finite (a corrupt checkpoint)
            owner, _, leaf = name.rpartition(".")
            record.param_values.setdefault(owner, []).append((slots.count([p], [leaf])[0], leaf))
        with _as_captured(model, capture):
            output = model(*capture.args, **capture.kwargs)
            leaves = tensors(output)
            # an output no gradient came back to (a diagnostic the loss does not use) cannot have made the step bad
            used = [t for i, t in enumerate(leaves)
                    if t.is_floating_point() and (i in capture.output_grads or not capture.output_grads)]
            record.outputs = slots.count(used, _names("model output", used))
            # a 0-dim output non-finite while every tensor output (used or not) is finite: a loss computed in the
            # forward (a Hugging Face model given labels=)
            record.scalar_outputs = [s for s, t in zip(record.outputs, used) if t.dim() == 0]
            others = [t for t in leaves if t.is_floating_point() and t.dim() > 0 and all(t is not u for u in used)]
            record.other_outputs = slots.count(others, _names("model output", others))
            pairs = [(leaves[i], g) for i, g in sorted(capture.output_grads.items())]
            rows = [None if r is None else slots.add(r, "rows") for r in (_rows(g, sample_dim) for _, g in pairs)]
            record.output_grads = slots.count([g for _, g in pairs], _names("gradient arriving at output", pairs))
            record.output_grad_rows = rows
            if pairs and params:
                grads = torch.autograd.grad([o for o, _ in pairs], [p for _, p in params], [g for _, g in pairs],
                                            allow_unused=True)
                _count_params(record, params, grads)
    except Exception as error:  # a model the hooks cannot replay: say so in the report instead of failing
        record.error = f"{type(error).__name__}: {error}"
    finally:
        for handle in handles:
            handle.remove()
    return record


def _count_params(record, params, grads):
    for (name, _), grad in zip(params, grads):
        if grad is None:
            continue
        owner, _, leaf = name.rpartition(".")
        slot = record.slots.count([grad], [f"{leaf}.grad"])[0]
        record.params.setdefault(owner, []).append((slot, f"{leaf}.grad"))
        norm = torch.linalg.vector_norm(torch.nan_to_num(grad.detach(), 0.0, 0.0, 0.0), dtype=torch.float32)
        record.norms.append((record.slots.add(norm, name), name))
