"""sanitize_batch: train on the good samples of a batch that holds a few NaN/Inf rows, with no host sync.

One pass over each float batch tensor (the Triton kernel in kernels/sanitize.py on CUDA, its PyTorch twin in
nanfuse/fallback/sanitize.py on CPU), then one masked write of the target.
"""

from typing import NamedTuple

import torch

from . import _backend
from .fallback import sanitize as torch_path


class SanitizeResult(NamedTuple):
    """What sanitize_batch found; both fields are device tensors (reading them is the caller's choice)."""
    bad_rows: torch.Tensor  # bool (N,): True for the samples that held a NaN or Inf in any input tensor
    bad_count: torch.Tensor  # int64 0-dim: how many samples that is


def _inputs(inputs):
    tensors = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    for i, x in enumerate(tensors):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"inputs[{i}] must be a tensor, got {type(x).__name__}")
        if x.dim() == 0:
            raise ValueError(f"inputs[{i}] is 0-dim; dim 0 must be the sample dim")
        if x.is_complex():  # its NaN would go unseen: refuse rather than skip it
            raise TypeError(f"inputs[{i}] is complex ({x.dtype}); sanitize_batch takes real tensors")
        if x.is_floating_point() and x.element_size() == 1:  # PyTorch has no isfinite/masked_fill for float8
            raise TypeError(f"inputs[{i}] is {x.dtype}; sanitize_batch takes float16, bfloat16, float32, float64")
    if not tensors:
        raise ValueError("inputs: give at least one batch tensor")
    return tensors


def sanitize_batch(inputs, target=None, *, ignore_index=-100, fill=0.0):
    """Find the samples (dim 0) holding a NaN/Inf in any of `inputs`, overwrite those values with `fill` and
    set their `target` rows ((N,) or (N, L) class indices) to `ignore_index`; all in place.

    `inputs`: one tensor or a sequence of them, all with N samples on one device; float tensors of any dtype
    are sanitized, others (token ids) cannot hold NaN and are left alone. Returns SanitizeResult(bad_rows,
    bad_count) as device tensors: no host sync. Cost: one read of each float input (plus the few bad values
    written) on the Triton path, a read and a masked write on the PyTorch path; one masked write of `target`.
    """
    tensors = _inputs(inputs)
    n, device = tensors[0].shape[0], tensors[0].device
    if isinstance(fill, bool) or not isinstance(fill, (int, float)):
        raise TypeError(f"fill must be a float, got {type(fill).__name__}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):  # as F.cross_entropy's
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if target is not None and not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a tensor or None, got {type(target).__name__}")
    fill = float(fill)
    if not -float("inf") < fill < float("inf"):  # never invent a non-finite value
        raise ValueError(f"fill must be finite, got {fill}")
    for i, x in enumerate(tensors):
        if x.shape[0] != n or x.device != device:
            raise ValueError(f"inputs[{i}] has {x.shape[0]} samples on {x.device}; inputs[0] has {n} on {device}")
        if x.is_floating_point() and not -torch.finfo(x.dtype).max <= fill <= torch.finfo(x.dtype).max:
            raise ValueError(f"fill={fill} is not finite in inputs[{i}]'s dtype {x.dtype}")
    if target is not None:
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"target must hold integer class indices, got {target.dtype}")
        if not torch.iinfo(target.dtype).min <= ignore_index <= torch.iinfo(target.dtype).max:
            raise ValueError(f"ignore_index={ignore_index} does not fit target's dtype {target.dtype}")
        if target.dim() not in (1, 2) or target.shape[0] != n or target.device != device:
            raise ValueError(f"target must be (N,) or (N, L) with N={n} on {device}, got {tuple(target.shape)} "
                             f"on {target.device}")
    bad_rows = torch.zeros(n, dtype=torch.uint8, device=device)
    with torch.no_grad():
        for x in tensors:
            if not x.is_floating_point() or not x.numel():
                continue
            if _backend.uses_triton(x) and x.is_contiguous():
                from .kernels import sanitize as kernels

                kernels.sanitize_(x, bad_rows, fill)
            else:
                torch_path.sanitize_(x, bad_rows, fill)
        bad_rows = bad_rows.view(torch.bool)
        if target is not None:
            target.masked_fill_(bad_rows.view(-1, *[1] * (target.dim() - 1)), ignore_index)
    return SanitizeResult(bad_rows, bad_rows.sum())
