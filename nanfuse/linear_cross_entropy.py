"""nanfuse.linear_cross_entropy: cross_entropy(F.linear(input, W, b), target) without the N x V logits: the
autograd Function, the functional API and the module. The chunk loop is in _linear_cross_entropy_impl.
"""

import math

import torch
from torch import nn

from . import _backend
from ._checks import ArgumentError, check_cross_entropy_args, check_ignore_index
from ._cross_entropy_impl import CrossEntropyOptions, check_target_range
from ._linear_cross_entropy_impl import backward_pass, default_chunk_rows, forward_pass
from .cross_entropy import _check_targets


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd node of linear_cross_entropy on (N, D) input (the eager path)."""

    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, target, weight, opts, chunk_rows, fp32_accumulation,
                grad_enabled):
        needs = tuple(need and grad_enabled for need in ctx.needs_input_grad[:3])  # no_grad: the losses only
        loss, *held = forward_pass(input, linear_weight, linear_bias, target, weight, opts, chunk_rows,
                                   fp32_accumulation, needs)
        ctx.opts, ctx.chunk_rows, ctx.fp32_accumulation = opts, chunk_rows, fp32_accumulation
        ctx.dtypes = (input.dtype, linear_weight.dtype)
        kept = (input, linear_weight, linear_bias) if opts.reduction == "none" else (None, None, None)
        ctx.save_for_backward(*kept, target, weight, *held)
        return loss

    @staticmethod
    def backward(ctx, d_loss):
        if torch.is_grad_enabled():
            raise RuntimeError("nanfuse.linear_cross_entropy: backward with create_graph=True (a double backward) "
                               "is not supported: forward keeps only the first-order gradients")
        input, linear_weight, linear_bias, target, weight, *held, scale = ctx.saved_tensors
        grads = backward_pass((input, linear_weight, linear_bias), target, weight, held, scale, ctx.dtypes, ctx.opts,
                              ctx.chunk_rows, ctx.fp32_accumulation, ctx.needs_input_grad[:3], d_loss)
        return (*grads, None, None, None, None, None, None)


class DtypeError(TypeError, RuntimeError):
    """A tensor of a non-floating dtype: a TypeError as in nanfuse, and the RuntimeError F.linear raises."""


def _autocast_on(device_type):
    """torch.is_autocast_enabled, False on devices without autocast (meta), where it raises."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _check_floating(name, tensor):
    if not isinstance(tensor, torch.Tensor):  # F.linear: TypeError
        raise TypeError(f"{name} must be a floating-point tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise DtypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")


def _check_args(input, linear_weight, linear_bias, target, weight, opts, chunk_rows, grad_enabled):
    """Raise, naming the argument, as F.linear and F.cross_entropy do (ArgumentError where they raise
    RuntimeError)."""
    for name, tensor in (("input", input), ("linear_weight", linear_weight)):
        _check_floating(name, tensor)
    if input.dim() == 0:
        raise ArgumentError("input must have a feature dimension: shape (D,), (N, D) or (..., D), got a scalar")
    if linear_weight.dim() != 2 or linear_weight.shape[1] != input.shape[-1]:
        raise ArgumentError(f"linear_weight must have shape (V, {input.shape[-1]}) for input of shape "
                            f"{tuple(input.shape)}, got {tuple(linear_weight.shape)}")
    if linear_weight.shape[0] == 0:
        raise ArgumentError("linear_weight has no rows: no classes")
    if linear_bias is not None:
        _check_floating("linear_bias", linear_bias)
        if linear_bias.shape != linear_weight.shape[:1]:
            raise ArgumentError(f"linear_bias must have shape ({linear_weight.shape[0]},), got "
                                f"{tuple(linear_bias.shape)}")
    for name, tensor in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if tensor is None:
            continue
        if tensor.device != input.device:
            raise ArgumentError(f"{name} is on {tensor.device} but input is on {input.device}")
        if tensor.dtype != input.dtype and not _autocast_on(input.device.type):
            raise ArgumentError(f"{name} has dtype {tensor.dtype} but input has {input.dtype} (outside autocast "
                                "they must match, as in F.linear)")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    n_classes = linear_weight.shape[0]
    expected = input.shape[:-1] + ((n_classes,) if target.is_floating_point() else ())
    if target.shape != expected:
        raise ArgumentError(f"target must have shape {tuple(expected)} for input {tuple(input.shape)} "
                            f"({'class probabilities' if target.is_floating_point() else 'class indices'}), "
                            f"got {tuple(target.shape)}")
    if grad_enabled and target.requires_grad:
        raise ValueError("target requires grad: linear_cross_entropy computes no gradient of probability targets; "
                         "pass target.detach()")
    if grad_enabled and weight is not None and isinstance(weight, torch.Tensor) and weight.requires_grad:
        raise ArgumentError("linear_cross_entropy is not differentiable with respect to argument 'weight' (the "
                            "class weights): pass a weight that does not require grad")
    stand_in = input.new_empty(()).expand(math.prod(input.shape[:-1]), n_classes)  # the logits' shape, no memory
    flat_target = target.reshape(-1, n_classes) if target.is_floating_point() else target.reshape(-1)
    check_cross_entropy_args(stand_in, flat_target, weight, opts)
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                   or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean",
                         ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0,
                         chunk_rows=None, accumulate_in_weight_dtype=False):
    """nanfuse.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...) with the class dimension
    last, never forming the N x V logits: input (..., D), linear_weight (V, D), target (...) class indices or
    (..., V) probabilities. chunk_rows: rows per chunk (default: a 64 MiB chunk of logits);
    accumulate_in_weight_dtype: sum grad_weight in the weight's dtype instead of fp32.
    Cost: three matmuls over each chunk of logits in forward, one read and one write of it; backward one pass
    over the N x D and V x D gradients (none on CPU for an upstream factor of 1).
    """
    opts = CrossEntropyOptions(check_ignore_index(ignore_index), reduction, float(label_smoothing), float(z_loss),
                               None if softcap is None else float(softcap), float(logit_scale), False)
    grad_enabled = torch.is_grad_enabled()
    _check_args(input, linear_weight, linear_bias, target, weight, opts, chunk_rows, grad_enabled)
    device_type = input.device.type
    if _autocast_on(device_type) and input.dtype == torch.float32:  # as F.linear under autocast
        input = input.to(torch.get_autocast_dtype(device_type))
    n_classes = linear_weight.shape[0]
    out_shape = input.shape[:-1]
    flat_input = input.reshape(math.prod(out_shape), input.shape[-1])  # not -1: D may be 0
    if flat_input.stride(-1) != 1:
        flat_input = flat_input.contiguous()
    prob_target = target.is_floating_point()
    flat_target = target.reshape(-1, n_classes).contiguous() if prob_target else target.reshape(-1).long().contiguous()
    if not prob_target and _check_targets(flat_target):  # CPU: a bad class index is a ValueError naming target
        check_target_range(flat_target, n_classes, opts.ignore_index)
    if weight is not None:
        weight = weight.contiguous()
    rows = chunk_rows or default_chunk_rows(n_classes, input.dtype)
    fp32_accumulation = not accumulate_in_weight_dtype
    if _backend.through_registered_ops():
        loss = _registered(flat_input, linear_weight, linear_bias, flat_target, weight, opts, rows, fp32_accumulation)
    else:
        loss = LinearCrossEntropyFunction.apply(flat_input, linear_weight, linear_bias, flat_target, weight, opts,
                                                rows, fp32_accumulation, grad_enabled)
    return loss.reshape(out_shape) if reduction == "none" else loss


def _registered(*args):
    from ._linear_cross_entropy_op import linear_cross_entropy_op

    return linear_cross_entropy_op(*args)


class LinearCrossEntropyLoss(nn.Module):
    """The loss head of a language model: linear_cross_entropy(input, self.weight, target, linear_bias=self.bias)
    with nn.Linear's parameters (in_features -> out_features classes) and the loss options given here."""

    def __init__(self, in_features, out_features, bias=False, *, weight=None, reduction="mean", ignore_index=-100,
                 label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0, chunk_rows=None,
                 accumulate_in_weight_dtype=False, device=None, dtype=None):
        super().__init__()
        linear = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight, self.bias = linear.weight, linear.bias
        self.register_buffer("class_weight", weight)
        self.options = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
                            z_loss=z_loss, softcap=softcap, logit_scale=logit_scale, chunk_rows=chunk_rows,
                            accumulate_in_weight_dtype=accumulate_in_weight_dtype)

    def forward(self, input, target):
        return linear_cross_entropy(input, self.weight, target, linear_bias=self.bias, weight=self.class_weight,
                                    **self.options)
