"""nanfuse's ops registered with torch.library, the form torch.compile sees them in.

Each op is opaque to Dynamo and Inductor: a compiled graph calls it as one node (on CUDA it launches the
Triton kernels, on CPU it runs the chunked PyTorch path) instead of tracing into the autograd Function
or unrolling the CPU row-chunk loop. A fake implementation gives the output shapes for tracing, and
register_autograd gives AOTAutograd the backward. The public functions route here under
torch.compile (and inside nanfuse._backend.registered_ops()); plain eager calls take the autograd
Functions directly, which skips the dispatcher's per-call cost.

Differences from the eager path, all of memory, none of results: `inplace_backward` is not honoured (the
gradient gets its own buffer), and backward of mean/sum scales the saved gradient out of place.
"""

import itertools
import weakref

import torch
from torch import Tensor

from . import _grad_norm_impl
from ._cross_entropy_impl import (
    CrossEntropyOptions,
    forward_pass,
    implementation,
    input_grads,
    rows_backward,
    scale_grad,
    writes_grad_in_forward,
)
from ._optimizer_step import fused_step
from ._softmax_impl import differentiable_rows_backward as softmax_differentiable_rows_backward
from ._softmax_impl import needs_differentiable_backward as softmax_needs_differentiable_backward
from ._softmax_impl import rows_backward as softmax_rows_backward
from ._softmax_impl import rows_forward as softmax_rows_forward

# ---------------------------------------------------------------- cross-entropy


def _options(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale, normalize_by=1.0):
    return CrossEntropyOptions(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale, False,
                               normalize_by)


@torch.library.custom_op("nanfuse::cross_entropy", mutates_args=())
def _cross_entropy(logits: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction: str,
                   label_smoothing: float, z_loss: float, softcap: float | None, logit_scale: float,
                   normalize_by: float, divisor: Tensor | None, compute_grad: bool
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, gradient for mean/sum or an empty tensor, row statistics, normalisers) of (N, C) logits; the
    loss divided by normalize_by and by the 0-dim `divisor` when given."""
    opts = _options(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale, normalize_by)
    loss, grad, stats, scalars = forward_pass(logits, target, weight, opts, compute_grad, divisor)
    return loss, logits.new_empty(0) if grad is None else grad, stats, scalars


@_cross_entropy.register_fake
def _(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale,
      normalize_by, divisor, compute_grad):
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = logits.new_empty(logits.shape[:1] if reduction == "none" else (), dtype=acc)
    has_grad = compute_grad and writes_grad_in_forward(logits, _options(ignore_index, reduction, 0.0, 0.0, None, 1.0))
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if has_grad else logits.new_empty(0)
    stats = implementation(logits, as_real=True).empty_stats(logits, target)  # the real op's path's shape
    return loss, grad, stats, logits.new_empty(3, dtype=acc)


def _cross_entropy_setup(ctx, inputs, output):
    logits, target, weight, *options, _, _ = inputs
    _, grad, stats, scalars = output
    ctx.mark_non_differentiable(grad, stats, scalars)
    ctx.set_materialize_grads(False)  # else backward gets an N x C zeros for the gradient output
    ctx.opts = _options(*options)
    writes_grad = writes_grad_in_forward(logits, ctx.opts)
    keep_logits = not writes_grad or target.requires_grad or (weight is not None and weight.requires_grad)
    ctx.save_for_backward(grad if writes_grad else None, logits if keep_logits else None, target, weight, scalars,
                          stats)


def _cross_entropy_backward(ctx, d_loss, *_):
    if d_loss is None:  # grads are not materialised: nothing flowed into the loss
        return (None,) * 12
    grad, logits, target, weight, scalars, stats = ctx.saved_tensors
    o = ctx.opts
    d_logits = d_target = d_weight = None
    if ctx.needs_input_grad[0] and grad is not None:
        d_logits = _cross_entropy_scale_grad(grad, d_loss)
    elif ctx.needs_input_grad[0]:
        d_logits = _cross_entropy_rows_backward(logits, target, weight, scalars, stats, d_loss.expand(len(logits)),
                                                o.ignore_index, o.label_smoothing, o.z_loss, o.softcap,
                                                o.logit_scale)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        d_target, d_weight = _cross_entropy_target_grads(logits, target, weight, scalars, d_loss, o.label_smoothing,
                                                         o.softcap, o.logit_scale, ctx.needs_input_grad[1],
                                                         ctx.needs_input_grad[2])
        d_target = d_target if ctx.needs_input_grad[1] else None
        d_weight = d_weight if ctx.needs_input_grad[2] else None
    return (d_logits, d_target, d_weight) + (None,) * 9


_cross_entropy.register_autograd(_cross_entropy_backward, setup_context=_cross_entropy_setup)


@torch.library.custom_op("nanfuse::cross_entropy_scale_grad", mutates_args=())
def _cross_entropy_scale_grad(grad: Tensor, factor: Tensor) -> Tensor:
    """The mean/sum gradient written by forward times the upstream factor, out of place."""
    out = scale_grad(grad, factor, in_place=False)
    return out.clone() if out is grad else out  # an op's output may not alias its input (CPU, factor 1)


@_cross_entropy_scale_grad.register_fake
def _(grad, factor):
    return torch.empty_like(grad)


@torch.library.custom_op("nanfuse::cross_entropy_rows_backward", mutates_args=())
def _cross_entropy_rows_backward(logits: Tensor, target: Tensor, weight: Tensor | None, scalars: Tensor,
                                 stats: Tensor, grad_output: Tensor, ignore_index: int, label_smoothing: float,
                                 z_loss: float, softcap: float | None, logit_scale: float) -> Tensor:
    """Gradient of reduction='none' from the saved row statistics and the upstream row gradients."""
    opts = _options(ignore_index, "none", label_smoothing, z_loss, softcap, logit_scale)
    return rows_backward(logits, target, weight, scalars, stats, grad_output, opts)


@_cross_entropy_rows_backward.register_fake
def _(logits, *_):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("nanfuse::cross_entropy_target_grads", mutates_args=())
def _cross_entropy_target_grads(logits: Tensor, target: Tensor, weight: Tensor | None, scalars: Tensor,
                                d_loss: Tensor, label_smoothing: float, softcap: float | None, logit_scale: float,
                                need_target: bool, need_weight: bool) -> tuple[Tensor, Tensor]:
    """(d/dtarget, d/dweight) of probability targets; an empty tensor for one not asked for."""
    opts = _options(-100, "none", label_smoothing, 0.0, softcap, logit_scale)
    d_target, d_weight = input_grads(logits, target, weight, scalars, opts, d_loss, (False, need_target, need_weight))
    return (logits.new_empty(0) if d_target is None else d_target,
            logits.new_empty(0) if d_weight is None else d_weight)


@_cross_entropy_target_grads.register_fake
def _(logits, target, weight, scalars, d_loss, label_smoothing, softcap, logit_scale, need_target, need_weight):
    return (torch.empty_like(target, memory_format=torch.contiguous_format) if need_target else logits.new_empty(0),
            torch.empty_like(weight) if need_weight else logits.new_empty(0))


def cross_entropy(logits, target, weight, opts, divisor=None):
    """The op's loss for (N, C) logits; what nanfuse.cross_entropy calls under torch.compile."""
    compute_grad = logits.requires_grad and torch.is_grad_enabled()
    return _cross_entropy(logits, target, weight, opts.ignore_index, opts.reduction, opts.label_smoothing,
                          opts.z_loss, opts.softcap, opts.logit_scale, opts.normalize_by, divisor, compute_grad)[0]


# ---------------------------------------------------------------- softmax


@torch.library.custom_op("nanfuse::softmax", mutates_args=())
def softmax(x: Tensor, log: bool, use_triton: bool | None = None) -> Tensor:
    """(log-)softmax over the rows of a 2-D tensor with contiguous rows; `use_triton` as the caller chose
    (None: the backend's choice now). Backward takes the same path."""
    return softmax_rows_forward(x, log, use_triton)


@softmax.register_fake
def _(x, log, use_triton=None):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("nanfuse::softmax_backward", mutates_args=())
def softmax_backward(y: Tensor, dy: Tensor, log: bool, use_triton: bool | None = None) -> Tensor:
    return softmax_rows_backward(y, dy, log, use_triton)


@softmax_backward.register_fake
def _(y, dy, log, use_triton=None):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def _softmax_setup(ctx, inputs, output):
    _, ctx.log, ctx.use_triton = inputs
    ctx.save_for_backward(output)


def _softmax_backward(ctx, dy):
    (y,) = ctx.saved_tensors
    if softmax_needs_differentiable_backward(y, dy):  # create_graph=True: PyTorch ops autograd can see through
        return softmax_differentiable_rows_backward(y, dy, ctx.log), None, None
    return softmax_backward(y, dy, ctx.log, ctx.use_triton), None, None


softmax.register_autograd(_softmax_backward, setup_context=_softmax_setup)


# ---------------------------------------------------------------- gradient norm, clip and guarded step


@torch.library.custom_op("nanfuse::grad_norm", mutates_args=())
def grad_norm(grads: list[Tensor], max_norm: float | None, norm_type: float) -> tuple[Tensor, Tensor, Tensor]:
    """(result [3]: norm, clip coefficient, found_inf (fp32, fp64 if any gradient is fp64); the norm of the
    finite values, fp64; counts int64[2]: NaN, Inf)."""
    return _grad_norm_impl.device_norm(grads, max_norm, norm_type)[0]


@grad_norm.register_fake
def _(grads, max_norm, norm_type):
    device = grads[0].device
    dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    return (torch.empty(3, dtype=dtype, device=device), torch.empty((), dtype=torch.float64, device=device),
            torch.empty(2, dtype=torch.int64, device=device))


@torch.library.custom_op("nanfuse::scale_grads_", mutates_args=("grads",))
def scale_grads_(grads: list[Tensor], factor: Tensor) -> None:
    """Multiply gradients on one device by a 0-dim device factor in place (free when it is 1)."""
    _grad_norm_impl.device_scale_(grads, factor)


@scale_grads_.register_fake
def _(grads, factor):
    return None


_OPTIMIZERS = weakref.WeakValueDictionary()
_NEXT_KEY = itertools.count()


def remember_optimizer(optimizer) -> int:
    """A new key fused_optimizer_step finds `optimizer` by (an op takes tensors and numbers, not objects).
    Keys are never reused, so a copied or unpickled guard that registers its own optimizer steps that one."""
    key = next(_NEXT_KEY)
    _OPTIMIZERS[key] = optimizer
    return key


@torch.library.custom_op("nanfuse::fused_optimizer_step", mutates_args=())
def fused_optimizer_step(key: int, grad_scale: Tensor, found_inf: Tensor, skipped_steps: Tensor) -> Tensor:
    """optimizer.step() of the PyTorch fused optimizer remembered under `key`, given grad_scale and found_inf;
    returns skipped_steps + found_inf. PyTorch's optimizer step cannot be traced with fullgraph=True
    (it calls torch._dynamo.graph_break()), so the compiled graph calls it as this one opaque node. It
    updates the parameters and optimizer state behind the graph's back: nothing after it in the same
    compiled region may read them (NanGuard.step ends with it).
    """
    fused_step(_OPTIMIZERS[key], grad_scale, found_inf)
    return skipped_steps + found_inf.to(skipped_steps.dtype)


@fused_optimizer_step.register_fake
def _(key, grad_scale, found_inf, skipped_steps):
    return torch.empty_like(skipped_steps)
