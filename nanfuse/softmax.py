"""nanfuse.softmax / nanfuse.log_softmax: max-subtracted, fp32-accumulated, NaN-free on masked rows.

A row whose entries are all -inf (a fully masked attention row) gives softmax 0 with gradient 0
and log_softmax -inf with gradient equal to the upstream one, where PyTorch gives NaN.
"""

import torch

from . import _backend
from ._checks import check_logits


def _implementation(x):
    if _backend.uses_triton(x):
        from .kernels import softmax
    else:
        from .fallback import softmax
    return softmax


def rows_forward(x, log):
    """(log-)softmax of each row of a 2-D tensor with contiguous rows, into a new tensor of x's dtype."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    with _backend.no_autocast(x):
        _implementation(x).softmax_forward(x, y, log)
    return y


def rows_backward(y, dy, log):
    """Input gradient of rows_forward from its output y and the upstream gradient dy."""
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    dx = torch.empty_like(y)
    with _backend.no_autocast(y):
        _implementation(y).softmax_backward(y, dy, dx, log)
    return dx


class SoftmaxFunction(torch.autograd.Function):
    """Autograd node of (log-)softmax over the last dim of a 2-D tensor with contiguous rows (the eager path)."""

    @staticmethod
    def forward(ctx, x, log):
        y = rows_forward(x, log)
        ctx.log = log
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return rows_backward(y, dy, ctx.log), None


def _rows(x, log):
    if _backend.through_registered_ops():
        from . import _ops

        return _ops.softmax(x, log)
    return SoftmaxFunction.apply(x, log)


def _apply(input, dim, log):
    check_logits("input", input)
    if input.dim() == 0:
        return _rows(input.reshape(1, 1), log).reshape(())
    dim = dim % input.dim()
    moved = input.movedim(dim, -1)
    rows = moved.reshape(-1, moved.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return _rows(rows, log).reshape(moved.shape).movedim(-1, dim)


def softmax(input, dim=-1):
    """softmax over `dim` in the input's dtype (fp32 math); an all -inf row gives 0. Passes: read 2x, write 1x."""
    return _apply(input, dim, log=False)


def log_softmax(input, dim=-1):
    """log_softmax over `dim` (fp32 math); an all -inf row gives -inf. Passes: read 2x, write 1x."""
    return _apply(input, dim, log=True)
