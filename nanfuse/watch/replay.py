"""Replay one captured model call with hooks on every submodule, counting the non-finite values of every
module's inputs, outputs, grad_outputs and grad_inputs and of every parameter gradient, as device tensors.

Runs only for a step already known to be bad (or a gradient-norm jump), so per-tensor checks are fine here.
The replay restores what it touches: the RNG states and the model's buffers (BatchNorm statistics) are put
back as they were, and gradients come from torch.autograd.grad, so no .grad is changed.
"""

import contextlib
import dataclasses
import inspect
import warnings

import torch
from torch.utils._pytree import tree_leaves


@dataclasses.dataclass
class Capture:
    """What one call of the watched model needs to be replayed; tensors are kept by reference."""
    args: tuple
    kwargs: dict
    cpu_rng: torch.Tensor
    cuda_rng: dict  # device index -> generator state
    autocast: tuple  # (device type, enabled, dtype) for cpu and cuda
    output_grads: dict = dataclasses.field(default_factory=dict)  # output leaf index -> gradient arriving there


def _float_leaves(tree):
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor) and t.is_floating_point()]


class Slots:
    """Device values (non-finite counts, bad-row masks, norms) gathered during a replay, read in one go."""

    def __init__(self):
        self.values, self.labels = [], []

    def add(self, value, label):
        self.values.append(value.detach().double().reshape(-1))
        self.labels.append(label)
        return len(self.values) - 1

    def count(self, tensors, names):
        return [self.add((~torch.isfinite(t.detach())).sum(), name) for t, name in zip(tensors, names)]


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
        leaves = _float_leaves(value)
        named += [(t, f"input `{name}`" + (f"[{i}]" if len(leaves) > 1 else "")) for i, t in enumerate(leaves)]
    return named


@contextlib.contextmanager
def _as_captured(model, capture):
    """Run under the captured RNG and autocast states; put RNG states and buffers back afterwards."""
    cpu_rng = torch.get_rng_state()
    cuda_rng = {i: torch.cuda.get_rng_state(i) for i in capture.cuda_rng}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    torch.set_rng_state(capture.cpu_rng)
    for i, state in capture.cuda_rng.items():
        torch.cuda.set_rng_state(state, i)
    try:
        with contextlib.ExitStack() as stack, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")  # inputs without grad
            stack.enter_context(torch.enable_grad())
            for device_type, enabled, dtype in capture.autocast:
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
            yield
    finally:
        torch.set_rng_state(cpu_rng)
        for i, state in cuda_rng.items():
            torch.cuda.set_rng_state(state, i)
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)


@dataclasses.dataclass
class Replay:
    """The slots of one replayed call and how they are grouped (all indices into slots.values)."""
    slots: Slots
    inputs: list  # (slot, rows slot) per float input of the model call
    forward: list  # (module name, input slots, output slots) in completion order
    output_grads: list  # slots of the gradients arriving at the model's outputs
    backward: list  # (module name, grad_output slots, grad_input slots) in the order the hooks fired
    params: dict  # module name -> [(slot, 'name.grad')] for its own parameters
    norms: list  # (slot, parameter name): gradient norm of each parameter
    error: str | None = None


def replay(model, capture):
    """Run the captured call again with hooks on, then its backward from the captured output gradients."""
    slots = Slots()
    record = Replay(slots, [], [], [], [], {}, [])
    open_calls, handles = [], []

    def pre_hook(name):
        def hook(module, args, kwargs):
            tensors = _float_leaves((args, kwargs))
            open_calls.append(slots.count(tensors, _names(f"{name or 'model'} input", tensors)))
        return hook

    def post_hook(name):
        def hook(module, args, kwargs, output):
            tensors = _float_leaves(output)
            record.forward.append((name, open_calls.pop(), slots.count(tensors, _names("output", tensors))))
        return hook

    def backward_hook(name):
        def hook(module, grad_input, grad_output):
            outs, ins = [g for g in grad_output if g is not None], [g for g in grad_input if g is not None]
            record.backward.append((name, slots.count(outs, _names("grad_output", outs)),
                                    slots.count(ins, _names("grad_input", ins))))
        return hook

    for t, label in _argument_names(model, capture.args, capture.kwargs):
        rows = (~torch.isfinite(t.detach())).reshape(t.shape[0], -1).any(1) if t.dim() and t.numel() else None
        record.inputs.append((slots.count([t], [label])[0], None if rows is None else slots.add(rows, label)))
    try:
        for name, module in model.named_modules():
            handles += [module.register_forward_pre_hook(pre_hook(name), with_kwargs=True),
                        module.register_forward_hook(post_hook(name), with_kwargs=True),
                        module.register_full_backward_hook(backward_hook(name))]
        params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        with _as_captured(model, capture):
            output = model(*capture.args, **capture.kwargs)
            leaves = tree_leaves(output)
            pairs = [(leaves[i], g) for i, g in sorted(capture.output_grads.items())]
            record.output_grads = slots.count([g for _, g in pairs], _names("gradient arriving at output", pairs))
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
