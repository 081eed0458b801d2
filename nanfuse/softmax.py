"""nanfuse.softmax / nanfuse.log_softmax: max-subtracted, fp32-accumulated, NaN-free on masked rows.

A row whose entries are all -inf (a fully masked attention row) gives softmax 0 with gradient 0
and log_softmax -inf with gradient equal to the upstream one, where PyTorch gives NaN.
Forward and first-order backward run the kernels (or the chunked PyTorch path); a backward that must
itself be differentiated (create_graph=True, torch.func transforms) runs the same formula in PyTorch ops.
"""

import math
import operator

import torch

from . import _backend, _ops
from ._checks import UnsupportedInputError, check_logits
from ._softmax_impl import differentiable_rows_backward, needs_differentiable_backward, rows_backward, rows_forward


def _tangent(y, dx, log):
    """Forward-mode derivative of rows_forward at output y along input tangent dx (PyTorch ops, fp32 math)."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    out, t = y.to(acc), dx.to(acc)
    p = out.exp() if log else out
    centred = t - (p * t).sum(-1, keepdim=True)
    return (centred if log else out * centred).to(y.dtype)


class SoftmaxFunction(torch.autograd.Function):
    """Autograd node of (log-)softmax over the last dim of a 2-D tensor with contiguous rows (the eager path).
    setup_context, jvp and vmap make it work under torch.func (grad, vjp, jvp, vmap, jacrev, jacfwd)."""

    @staticmethod
    def forward(x, log):
        return rows_forward(x, log)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, log = inputs
        ctx.log = log
        ctx.use_triton = _backend.uses_triton(x)  # backward may run on another thread (CUDA): keep forward's choice
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        if needs_differentiable_backward(y, dy):
            return differentiable_rows_backward(y, dy, ctx.log), None
        return rows_backward(y, dy, ctx.log, ctx.use_triton), None

    @staticmethod
    def jvp(ctx, dx, _):
        (y,) = ctx.saved_tensors
        return _tangent(y, dx, ctx.log)

    @staticmethod
    def vmap(info, in_dims, x, log):
        """Batched rows are just more rows: fold the batch dim into the row dim."""
        batched = x.movedim(in_dims[0], 0)
        rows = batched.reshape(math.prod(batched.shape[:-1]), batched.shape[-1])  # -1 is ambiguous for 0 classes
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        return SoftmaxFunction.apply(rows, log).reshape(batched.shape), 0


# Function.apply binds its arguments to forward's signature (inspect.signature) for torch.func's sake, a cost
# that matters on small calls; outside a transform it then calls this, which needs every argument positionally
_apply_without_binding = super(torch.autograd.Function, SoftmaxFunction).apply


def _rows(x, log):
    if _backend.through_registered_ops():
        # chosen here, where torch.compile guards on the backend, and kept for backward (another thread on CUDA)
        return _ops.softmax(x, log, _backend.uses_triton(x))
    if torch._C._functorch.peek_interpreter_stack() is not None:  # torch.func: apply binds for its rules
        return SoftmaxFunction.apply(x, log)
    return _apply_without_binding(x, log)


def _checked_dim(input, dim):
    """dim as a non-negative index, with PyTorch's rules: an integer (an int, a NumPy integer, a 0-dim integer
    tensor; not a bool) in [-ndim, ndim) (a 0-dim tensor counts as 1-dim)."""
    if isinstance(dim, bool) or (isinstance(dim, torch.Tensor) and dim.dim() != 0):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    try:
        dim = operator.index(dim)
    except TypeError:
        raise TypeError(f"dim must be an int, got {type(dim).__name__}") from None
    n_dims = max(input.dim(), 1)
    if not -n_dims <= dim < n_dims:
        raise IndexError(f"dim out of range: expected an int in [{-n_dims}, {n_dims - 1}] for a "
                         f"{input.dim()}-dim input, got {dim}")
    return dim % n_dims


def _is_supported_float(dtype):
    return dtype.is_floating_point and dtype.itemsize >= 2  # float8 has no softmax in PyTorch either


def _apply(input, dim, dtype, log):
    if dtype is not None:
        if not (isinstance(dtype, torch.dtype) and _is_supported_float(dtype)):
            raise UnsupportedInputError(f"dtype must be a floating-point torch.dtype of 16 bits or more, got {dtype}")
        if isinstance(input, torch.Tensor):
            input = input.to(dtype)  # as PyTorch: cast first; the gradient flows back in input's own dtype
    if isinstance(input, torch.Tensor):
        if not _is_supported_float(input.dtype):
            raise UnsupportedInputError(f"input must be a floating-point tensor of 16 bits or more, got {input.dtype}")
        if input.layout != torch.strided:
            raise UnsupportedInputError(f"input must be a dense (strided) tensor, got layout {input.layout}")
    check_logits("input", input)
    dim = _checked_dim(input, dim)
    if input.dtype in (torch.float32, torch.float64) and _backend.eager_pytorch_on_cpu(input) and (
            torch._C._functorch.peek_interpreter_stack() is None):
        # on the host PyTorch's own op computes the same in the same dtype, with its own autograd, for a tenth of
        # the Python; unless a row came out NaN (all -inf, or a NaN or +inf in it): that call is redone here,
        # where an all -inf row gives 0 (log: -inf) and gradient 0 (log: the upstream one). One host read, free.
        # The sum is NaN exactly when an output is (softmax's are in [0, 1], log_softmax's in [-inf, 0]): one
        # reduction, a tenth of the cost of isnan().any() and its boolean copy of the output.
        out = (torch.log_softmax if log else torch.softmax)(input, dim)
        if not math.isnan(out.detach().sum().item()):
            return out
    if input.dim() == 0:
        return _rows(input.reshape(1, 1), log).reshape(())
    moved = input.movedim(dim, -1)
    rows = moved.reshape(math.prod(moved.shape[:-1]), moved.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = _rows(rows, log).reshape(moved.shape).movedim(-1, dim)
    return out.contiguous()  # a copy only when dim is not the last: PyTorch's output is contiguous too


def softmax(input, dim=-1, dtype=None):
    """softmax over `dim` (fp32 math), in `dtype` if given (input cast first, as PyTorch) else the input's;
    an all -inf row gives 0. Passes: read 2x, write 1x; a dim other than the last adds a copy in and out."""
    return _apply(input, dim, dtype, log=False)


def log_softmax(input, dim=-1, dtype=None):
    """log_softmax over `dim` (fp32 math), in `dtype` if given else the input's; an all -inf row gives -inf.
    Passes: read 2x, write 1x; a dim other than the last adds a copy in and out."""
    return _apply(input, dim, dtype, log=True)
