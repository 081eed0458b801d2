"""Gradient-norm clip with NaN/Inf check, with no device-to-host sync.

clip_grad_norm_ is a drop-in for torch.nn.utils.clip_grad_norm_; grad_norm_check reports without
changing anything. On CUDA (and through the interpreter) per device: one read of all gradients for
norm and flag (one launch per dtype, whatever the number of tensors), a one-program finalize, and
only when clipping is needed one more read and write: G bytes moved when the norm is under the
limit, 3G when it is over. Norm, coefficient and flag stay on the device.
"""

import collections
import functools
import math
import types
import warnings
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor

try:
    from torch.distributed.tensor import DTensor, Partial, Shard
except ImportError:  # a torch built without distributed
    DTensor = Partial = Shard = None

from . import _backend, _ops
from ._grad_norm_impl import device_norm, norm_kind
from .fallback import grad_norm as torch_path

FP32_MAX = torch.finfo(torch.float32).max


class GradNormReport(NamedTuple):
    """What one norm-and-check pass found; every field is a 0-dim tensor on the gradients' device."""
    total_norm: torch.Tensor  # fp32 (fp64 if any gradient is fp64): the norm of all gradients; NaN if any is
    # NaN, else Inf if any is Inf; a finite norm beyond the dtype's range saturates at its largest finite value
    clip_coef: torch.Tensor  # dtype of total_norm: the factor the gradients were (or would be) scaled by; 1 if
    # non-finite
    found_inf: torch.Tensor  # fp32: exactly 1.0 if any gradient value is NaN or Inf, else 0.0
    nonfinite_count: torch.Tensor  # int64: how many gradient values are NaN or Inf


def check_max_norm(max_norm):
    """max_norm as a float (or None), or a ValueError naming it: a number >= 0 (inf: never clip)."""
    if max_norm is None:
        return None
    if isinstance(max_norm, torch.Tensor) and max_norm.numel() != 1:
        raise ValueError(f"max_norm must be a number >= 0 or None, got a tensor of shape {tuple(max_norm.shape)}")
    try:
        value = float(max_norm)
    except (TypeError, ValueError):
        raise ValueError(f"max_norm must be a number >= 0 or None, got {max_norm!r}") from None
    if not value >= 0:  # False for NaN too
        raise ValueError(f"max_norm must be a number >= 0 or None, got {value}")
    return value


def _as_list(tensors, what):
    """The tensors as a list; like PyTorch's clip, warns when they come from an empty generator."""
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    items = list(tensors)
    if not items and isinstance(tensors, types.GeneratorType):
        warnings.warn(f"`parameters` is an empty generator, {what}.", stacklevel=4)
    return items


def _is_parameter(tensor):
    """True for an nn.Parameter or a leaf tensor that requires grad or holds a .grad: its .grad is the gradient.
    Anything else (a plain tensor, a non-leaf such as autograd.grad(create_graph=True) gives) is a gradient."""
    return isinstance(tensor, torch.nn.Parameter) or (tensor.is_leaf and (tensor.requires_grad
                                                                          or tensor.grad is not None))


def _memory_key(tensor):
    if DTensor is not None and isinstance(tensor, DTensor):
        return id(tensor)
    return tensor.device, tensor.data_ptr(), tensor.dtype, tensor.shape, tensor.stride()


def _unique(grads):
    """The gradients with repeats of the same memory (same tensor twice, or an identical view) left out: each
    is counted in the norm and scaled once."""
    if grads and isinstance(grads[0], FakeTensor):  # FakeTensorMode: no memory to compare, only the same tensor
        return list({id(g): g for g in grads}.values())
    if DTensor is None or not any(isinstance(g, DTensor) for g in grads):
        if len({g.data_ptr() for g in grads}) == len(grads):  # the common case, checked cheaply
            return grads
    return list({_memory_key(g): g for g in reversed(grads)}.values())[::-1]


def _gradients(parameters, grads_of_parameters_only):
    """Gradients to check: .grad of parameters (None skipped; see _is_parameter), other tensors themselves."""
    items = _as_list(parameters, "no gradient clipping will occur" if grads_of_parameters_only
                     else "there is nothing to check")
    for i, p in enumerate(items):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"parameters[{i}] must be a tensor, got {type(p).__name__}")
    grads = [p.grad if (grads_of_parameters_only or _is_parameter(p)) else p for p in items]
    # checked as sets first: per-tensor Python work adds up over thousands of small tensors
    if {g.layout for g in grads if g is not None} - {torch.strided}:
        i = next(i for i, g in enumerate(grads) if g is not None and g.layout != torch.strided)
        raise ValueError(f"parameters[{i}] has a sparse gradient ({grads[i].layout}); nanfuse's clip needs dense ones")
    if any(not dtype.is_floating_point for dtype in {g.dtype for g in grads if g is not None}):
        i = next(i for i, g in enumerate(grads) if g is not None and not g.is_floating_point())
        raise TypeError(f"parameters[{i}] has a gradient of dtype {grads[i].dtype}; it must be floating point")
    return _unique([g for g in grads if g is not None])


def _reduce_spec(grad, process_group):
    """(local tensor, process groups its norm must be reduced over) for a plain or DTensor gradient."""
    if DTensor is not None and isinstance(grad, DTensor):
        groups = []
        for dim, placement in enumerate(grad.placements):
            if isinstance(placement, Partial):
                raise ValueError("a gradient DTensor with a Partial placement has no local norm; redistribute it first")
            if isinstance(placement, Shard):
                groups.append(grad.device_mesh.get_group(dim))
        return grad.to_local(), tuple(groups)
    return grad, (() if process_group is None else (process_group,))


def _device_norm(grads, max_norm, norm_type):
    """((result [3]: norm, coef, flag; fp64 finite norm; counts int64[2]) for gradients on one device, and a
    function that scales them all by a 0-dim device factor in place; through the registered ops under
    torch.compile.
    """
    if _backend.through_registered_ops():
        return _ops.grad_norm(grads, max_norm, norm_type), functools.partial(_ops.scale_grads_, grads)
    return device_norm(grads, max_norm, norm_type)


def _combine(parts, norm_type):
    """fp64 norm of finite values and counts over several (finite norm, counts) parts, on the first one's device."""
    device = parts[0][0].device
    norms = torch.stack([norm.to(device, non_blocking=True) for norm, _ in parts])
    counts = torch.stack([c.to(device, non_blocking=True) for _, c in parts]).sum(0)
    scale, total = torch_path.combine_pairs(norms, torch.ones_like(norms), norm_type)  # a norm n is the pair (n, 1)
    return torch_path.pair_norm(scale, total, norm_type), counts


def _all_reduce(finite_norm, counts, norm_type, groups):
    """Reduce a local norm and counts over process groups: MAX of the norm, then SUM of scaled p-th powers."""
    top = finite_norm.double().clone()
    for group in groups:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    if norm_type == math.inf:
        packed = counts.to(torch.float64)
    else:
        ratio = torch.where(top > 0, finite_norm.double() / torch.where(top > 0, top, 1.0), 0.0)
        packed = torch.cat([(ratio.double() ** norm_type).reshape(1), counts.double()])
    for group in groups:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    if norm_type == math.inf:
        return top, packed.to(torch.int64)
    return top * packed[0] ** (1.0 / norm_type), packed[1:].to(torch.int64)


def norm_check_scale(grads, max_norm, norm_type, process_group, inv_scale=None):
    """GradNormReport over all gradients, and a function that scales them all by a device factor.

    With `inv_scale` (a 0-dim device tensor: GradScaler's 1 / scale) the gradients are loss-scaled: the
    report is of the gradients times inv_scale, read as they are (no unscaling pass first). Both run under
    torch.no_grad(), as PyTorch's clip: gradients from backward(create_graph=True) are scaled unrecorded.
    """
    norm_type, _ = norm_kind(norm_type)
    max_norm = check_max_norm(max_norm)
    if grads and inv_scale is None and process_group is None and _backend.eager_pytorch_on_cpu(grads[0]):
        # small CPU gradients that autograd does not track (so no no_grad() needed): norm read on the host
        norm = torch_path.host_norm(grads, norm_type)  # None elsewhere
        if norm is not None:
            return _host_report(grads, norm, max_norm)
    with torch.no_grad():  # a context, not a decorator: Dynamo leaves grad mode off after a decorated call
        return _norm_check_scale(grads, max_norm, norm_type, process_group, inv_scale)


def _norm_check_scale(grads, max_norm, norm_type, process_group, inv_scale):
    if not grads:  # no gradient values: a norm of 0 and its coefficient, as for empty gradients
        return _host_report(grads, 0.0, max_norm)[0], lambda coef: None
    dtype = torch_path.norm_dtype(grads)
    # group by (reduction groups, device): each group's local result, reduced where sharded
    buckets = collections.defaultdict(list)
    devices = {g.device for g in grads}
    if len(devices) == 1 and (DTensor is None or not any(isinstance(g, DTensor) for g in grads)):
        buckets[(() if process_group is None else (process_group,), devices.pop())] = grads
    else:
        for g in grads:
            local, groups = _reduce_spec(g, process_group)
            buckets[(groups, local.device)].append(local)
    parts, scalers = [], []
    device_max_norm = max_norm if inv_scale is None else None  # else the coefficient is formed after unscaling
    for (groups, device), local_grads in buckets.items():
        (result, finite_norm, counts), scale_ = _device_norm(local_grads, device_max_norm, norm_type)
        scalers.append((device, scale_))
        parts.append((finite_norm, counts, groups, result))
    if len(parts) == 1 and not parts[0][2] and inv_scale is None:  # the finalize said it all
        result, counts = parts[0][3], parts[0][1]
    else:
        reduced = [(_all_reduce(n, c, norm_type, g) if g else (n, c)) for n, c, g, _ in parts]
        finite_norm, counts = _combine(reduced, norm_type)
        if inv_scale is not None:  # every norm is homogeneous: ||g * s|| = ||g|| * s
            finite_norm = finite_norm * inv_scale.to(finite_norm.device, non_blocking=True).double()
        result, _, counts = torch_path.finish(finite_norm, counts, max_norm, dtype)
    report = GradNormReport(result[0], result[1], result[2].float(), counts.sum())

    def scale_all(coef):
        with torch.no_grad():
            for device, scale_ in scalers:
                scale_(coef.to(device, non_blocking=True))

    return report, scale_all


def _host_report(grads, norm, max_norm):
    """(report, scale_all) of finite fp32/fp16/bf16 CPU gradients (or none) from their norm, a Python float (fp64),
    as torch_path.finish forms them: the norm saturated at fp32's max, the coefficient from the unsaturated norm."""
    coef = 1.0 if max_norm is None else min(max_norm / (norm + 1e-6), 1.0)
    # four scalar_tensor calls cost less than one torch.tensor([...]) and its unbind
    fp32 = torch.float32  # whatever torch.get_default_dtype() says
    report = GradNormReport(torch.scalar_tensor(min(norm, FP32_MAX), dtype=fp32),
                            torch.scalar_tensor(coef, dtype=fp32), torch.scalar_tensor(0.0, dtype=fp32),
                            torch.scalar_tensor(0, dtype=torch.int64))
    return report, functools.partial(torch_path.scale_, grads)


def grad_norm_check(parameters_or_tensors, max_norm=None, norm_type=2.0, *, process_group=None):
    """Norm, clip coefficient, found-inf flag and non-finite count of the gradients; changes nothing.

    Takes parameters (their .grad is checked; None skipped) or gradient tensors themselves. All results
    are device tensors (no host sync). Cost: one read of the gradients.
    """
    report, _ = norm_check_scale(_gradients(parameters_or_tensors, False), max_norm, norm_type, process_group)
    return report


def clip_and_check_(parameters, max_norm, norm_type=2.0, *, process_group=None):
    """clip_grad_norm_ that returns the whole GradNormReport. Cost: G bytes moved, 3G when clipping."""
    report, scale_all = norm_check_scale(_gradients(parameters, True), max_norm, norm_type, process_group)
    if max_norm is not None:
        scale_all(report.clip_coef)
    return report


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None, *,
                    process_group=None):
    """Drop-in for torch.nn.utils.clip_grad_norm_: scales gradients so their global norm is <= max_norm.

    Returns the total norm (0-dim fp32 on the gradients' device) without a host sync. Differences from
    PyTorch: the norm is fp32 for any gradient dtype; finite gradients of any size give a finite norm;
    if the norm is NaN/Inf the gradients are left exactly as they were (not multiplied by NaN).
    error_if_nonfinite=True reads the flag (one host sync) and raises. `foreach` is accepted and ignored.
    `process_group` reduces the norm over ranks that each hold a shard of plain-tensor gradients
    (DTensor gradients are reduced over their mesh without it). Cost: G bytes moved, 3G when clipping.
    """
    if max_norm is None:  # as PyTorch's float(max_norm); clip_and_check_ and grad_norm_check take None: no clip
        raise TypeError("max_norm must be a number >= 0, got None")
    report = clip_and_check_(parameters, max_norm, norm_type, process_group=process_group)
    if error_if_nonfinite and bool(report.found_inf):  # opt-in: one host sync
        raise RuntimeError(f"The total norm of order {float(norm_type)} for gradients from `parameters` is "
                           "non-finite, so it cannot be clipped. Gradients were left unchanged.")
    return report.total_norm
