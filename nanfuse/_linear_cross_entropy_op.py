"""nanfuse.linear_cross_entropy registered with torch.library: the form torch.compile sees it in.

One opaque node for the whole chunk loop (Dynamo neither traces into it nor unrolls it), a fake
implementation for the shapes, and register_autograd for the backward. Same results as the eager autograd
Function; under torch.compile the held gradients are scaled by plain tensor ops in the backward graph.
"""

import torch
from torch import Tensor

from ._cross_entropy_impl import CrossEntropyOptions
from ._linear_cross_entropy_impl import _accumulation_dtype, backward_pass, forward_pass, is_final


def _options(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale):
    return CrossEntropyOptions(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale, False)


def _or_empty(tensor, like):
    return like.new_empty(0) if tensor is None else tensor


@torch.library.custom_op("nanfuse::linear_cross_entropy", mutates_args=())
def _forward(input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor, weight: Tensor | None,
             ignore_index: int, reduction: str, label_smoothing: float, z_loss: float, softcap: float | None,
             logit_scale: float, chunk_rows: int, fp32_accumulation: bool, need_input: bool, need_weight: bool,
             need_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, held grad_input, grad_weight, grad_bias (empty where not needed), scale) of (N, D) input."""
    opts = _options(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale)
    loss, *held, scale = forward_pass(input, linear_weight, linear_bias, target, weight, opts, chunk_rows,
                                      fp32_accumulation, (need_input, need_weight, need_bias))
    return loss, *(_or_empty(h, input) for h in held), scale


@_forward.register_fake
def _(input, linear_weight, linear_bias, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
      logit_scale, chunk_rows, fp32_accumulation, need_input, need_weight, need_bias):
    acc = _accumulation_dtype(input)
    loss = input.new_empty(input.shape[:1] if reduction == "none" else (), dtype=acc)
    weight_acc = _accumulation_dtype(linear_weight) if fp32_accumulation else linear_weight.dtype
    keeps = reduction != "none"
    grad_input = torch.empty_like(input) if keeps and need_input else input.new_empty(0)
    grad_weight = (input.new_empty(linear_weight.shape, dtype=weight_acc) if keeps and need_weight
                   else input.new_empty(0))
    grad_bias = input.new_empty(linear_weight.shape[:1], dtype=weight_acc) if keeps and need_bias else \
        input.new_empty(0)
    return loss, grad_input, grad_weight, grad_bias, input.new_empty((), dtype=acc)


def _setup(ctx, inputs, output):
    input, linear_weight, linear_bias, target, weight, *options, chunk_rows, fp32_accumulation, _, _, _ = inputs
    _, *held, scale = output
    ctx.mark_non_differentiable(*held, scale)
    ctx.opts = _options(*options)
    ctx.chunk_rows, ctx.fp32_accumulation = chunk_rows, fp32_accumulation
    ctx.dtypes = (input.dtype, linear_weight.dtype)
    kept = (input, linear_weight, linear_bias) if ctx.opts.reduction == "none" else (None, None, None)
    ctx.save_for_backward(*kept, target, weight, *held, scale)


def _backward(ctx, d_loss, *_):
    input, linear_weight, linear_bias, target, weight, *held, scale = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    o = ctx.opts
    if o.reduction == "none":
        grads = _backward_none(input, linear_weight, linear_bias, target, weight, d_loss, o.ignore_index,
                               o.label_smoothing, o.z_loss, o.softcap, o.logit_scale, ctx.chunk_rows,
                               ctx.fp32_accumulation, *needs)
        grads = [g if need else None for g, need in zip(grads, needs)]
    else:
        final = (ctx.dtypes[0], ctx.dtypes[1], ctx.dtypes[1])
        grads = [(g * (d_loss if is_final(g, dtype, role) else scale * d_loss)).to(dtype) if need else None
                 for role, (g, dtype, need) in enumerate(zip(held, final, needs))]
    return (*grads,) + (None,) * 13


_forward.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("nanfuse::linear_cross_entropy_backward", mutates_args=())
def _backward_none(input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, target: Tensor,
                   weight: Tensor | None, grad_output: Tensor, ignore_index: int, label_smoothing: float,
                   z_loss: float, softcap: float | None, logit_scale: float, chunk_rows: int, fp32_accumulation: bool,
                   need_input: bool, need_weight: bool, need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of reduction='none' for the rows' upstream gradients, each chunk recomputed (empty where not
    needed)."""
    opts = _options(ignore_index, "none", label_smoothing, z_loss, softcap, logit_scale)
    grads = backward_pass((input, linear_weight, linear_bias), target, weight, None, None,
                          (input.dtype, linear_weight.dtype), opts, chunk_rows, fp32_accumulation,
                          (need_input, need_weight, need_bias), grad_output)
    return tuple(_or_empty(g, input) for g in grads)


@_backward_none.register_fake
def _(input, linear_weight, linear_bias, target, weight, grad_output, ignore_index, label_smoothing, z_loss, softcap,
      logit_scale, chunk_rows, fp32_accumulation, need_input, need_weight, need_bias):
    return (torch.empty_like(input) if need_input else input.new_empty(0),
            torch.empty_like(linear_weight) if need_weight else input.new_empty(0),
            input.new_empty(linear_weight.shape[:1], dtype=linear_weight.dtype) if need_bias else input.new_empty(0))


def linear_cross_entropy_op(input, linear_weight, linear_bias, target, weight, opts, chunk_rows, fp32_accumulation):
    """The op's loss for (N, D) input; what nanfuse.linear_cross_entropy calls under torch.compile."""
    grad_enabled = torch.is_grad_enabled()
    needs = [grad_enabled and t is not None and t.requires_grad for t in (input, linear_weight, linear_bias)]
    return _forward(input, linear_weight, linear_bias, target, weight, opts.ignore_index, opts.reduction,
                    opts.label_smoothing, opts.z_loss, opts.softcap, opts.logit_scale, chunk_rows, fp32_accumulation,
                    *needs)[0]
