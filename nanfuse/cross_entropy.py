"""nanfuse.cross_entropy: a drop-in for F.cross_entropy whose forward writes the fp32 gradient.

The logits are streamed once per row (online max-subtracted log-sum-exp in fp32). For fp32 mean/sum the
gradient is written in the same pass and is what backward keeps, so the usual loss.backward() moves two
logits-sized passes in all. fp16/bf16 (and fp64, and reduction='none') keep the logits instead and backward
recomputes the gradient in one read and one write, with the upstream factor folded in before the one
rounding (see writes_grad_in_forward). No N x C softmax or fp32 copy is ever kept. Finite logits give a
finite loss and gradient.
"""

import dataclasses
import math
import os
import sys

import torch
from torch import nn

from . import _backend, _ops
from ._checks import check_cross_entropy_args, check_ignore_index
from ._cross_entropy_impl import (
    DEFAULT_OPTIONS,
    CrossEntropyOptions,
    check_target_range,
    differentiable_backward,
    forward_pass,
    input_grads,
    rows_backward,
    scale_grad,
    takes_plain_path,
    writes_grad_in_forward,
)

__all__ = ["CrossEntropyFunction", "CrossEntropyLoss", "CrossEntropyOptions", "cross_entropy"]


def _unwrapped(tensor):
    while tensor is not None and torch._C._functorch.is_functorch_wrapped_tensor(tensor):
        tensor = torch._C._functorch.get_unwrapped(tensor)
    return tensor


_NO_DOUBLE_BACKWARD = (
    "nanfuse.cross_entropy: backward with create_graph=True (a double backward) needs the logits, which "
    "reduction='{}' on fp32 logits does not keep (it keeps the gradient written in forward, in place of the "
    "logits with inplace_backward=True); use reduction='none' and reduce the result yourself, which keeps the "
    "logits and supports double backward")


class CrossEntropyFunction(torch.autograd.Function):
    """Autograd node of cross_entropy on (N, C) logits with contiguous classes (the eager path).

    forward returns (loss, gradient or an empty tensor, row statistics, normalisers); only the loss is
    differentiable. keep_logits saves the logits for backward beyond reduction='none' (gradients of
    probability targets, torch.func).
    """

    @staticmethod
    def forward(logits, target, weight, opts, compute_grad, keep_logits, divisor=None):
        loss, grad, stats, scalars = forward_pass(logits, target, weight, opts, compute_grad, divisor, keep_logits)
        if grad is not None and opts.inplace_backward:
            # the logits now hold the gradient: any op that saved them must fail loudly in backward
            torch.autograd.graph.increment_version(logits)
        return loss, logits.new_empty(0) if grad is None or grad is logits else grad, stats, scalars

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, weight, opts, compute_grad, keep_logits, _ = inputs
        _, grad, stats, scalars = output
        ctx.mark_non_differentiable(grad, stats, scalars)
        # autograd would otherwise fill a zero gradient for each of those outputs: an N x C zeros in backward
        ctx.set_materialize_grads(False)
        ctx.opts, ctx.backward_done = opts, False
        saved_grad = None
        if compute_grad and writes_grad_in_forward(logits, opts):
            saved_grad = logits if opts.inplace_backward else grad
        kept = logits if keep_logits or not writes_grad_in_forward(logits, opts) else None
        ctx.save_for_backward(saved_grad, kept, target, weight, scalars, stats)

    @staticmethod
    def backward(ctx, d_loss, *_):
        if d_loss is None:  # grads are not materialised: nothing flowed into the loss
            return (None,) * 7
        opts = ctx.opts
        saved_grad, logits, target, weight, scalars, stats = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        # one upstream gradient per batch entry (vmap of a vjp, is_grads_batched=True): the kernels take one
        functorch = torch._C._functorch
        batched = functorch.is_batchedtensor(d_loss) or functorch.is_legacy_batchedtensor(d_loss)
        if torch.is_grad_enabled() or batched:  # create_graph=True, or torch.func: the gradient must be differentiable
            if logits is None or saved_grad is logits:
                if batched and not torch.is_grad_enabled():  # the gradient written in forward, times each factor
                    return saved_grad * d_loss, None, None, None, None, None, None
                raise RuntimeError(_NO_DOUBLE_BACKWARD.format(opts.reduction))
            grads = differentiable_backward(logits, target, weight, scalars, opts, d_loss, needs, batched)
            if grads is not None:
                return grads + (None,) * 4
            # the kernels take plain tensors, not torch.func's wrappers of a transform that has ended
            saved_grad, logits, target, weight, scalars, stats, d_loss = (
                _unwrapped(t) for t in (saved_grad, logits, target, weight, scalars, stats, d_loss))
        d_logits = None
        if needs[0] and saved_grad is not None:
            in_place = _backend.uses_triton(saved_grad)
            if ctx.backward_done and in_place:
                raise RuntimeError(
                    "nanfuse.cross_entropy: on the Triton path the gradient written in forward is scaled in "
                    "place by backward, so it cannot run twice through the same graph (retain_graph=True); use "
                    "reduction='none' and .sum()/.mean() the result instead")
            ctx.backward_done = True
            d_logits = scale_grad(saved_grad, d_loss, in_place)
        elif needs[0]:
            d_logits = rows_backward(logits, target, weight, scalars, stats, d_loss, opts)
            if opts.inplace_backward:
                torch.autograd.graph.increment_version(logits)
        d_target = d_weight = None
        if needs[1] or needs[2]:
            d_target, d_weight = input_grads(logits, target, weight, scalars, opts, d_loss, needs)
        return d_logits, d_target, d_weight, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, logits, target, weight, opts, compute_grad, keep_logits, divisor=None):
        """torch.vmap: one call per batch entry (a per-sample loss), stacked."""
        def entry(tensor, dim, b):
            return tensor if dim is None or tensor is None else tensor.select(dim, b)

        if not target.is_floating_point() and _check_targets(target):
            check_target_range(target, logits.shape[-1], opts.ignore_index)
        outputs = [CrossEntropyFunction.apply(*(entry(t, d, b) for t, d in zip((logits, target, weight), in_dims)),
                                              opts, compute_grad, keep_logits, entry(divisor, in_dims[6], b))
                   for b in range(info.batch_size)]
        return tuple(torch.stack(column) for column in zip(*outputs)), (0, 0, 0, 0)


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *,
                  z_loss=0.0, softcap=None, logit_scale=1.0, inplace_backward=False, normalize_by=None):
    """Cross-entropy of logits `input` (class dim 1) against class indices or class probabilities.

    Same arguments and results as torch.nn.functional.cross_entropy, plus `logit_scale` (logits are
    multiplied by it), `softcap` (then softcap * tanh(x / softcap)), `z_loss` (adds z_loss * lse**2 per
    non-ignored row, unweighted), `inplace_backward` (the gradient overwrites `input`) and `normalize_by`
    (a nonzero number or a 0-dim tensor, not differentiated: the result is divided by it, folded into
    forward so that loss.backward() needs no pass of its own; e.g. transformers' num_items_in_batch with
    reduction='sum', or the number of accumulation steps). The loss is fp32 (fp64 for fp64 input); an empty
    or fully ignored batch gives 0.0, not NaN.
    Cost: one read of the logits, plus one write of the gradient when `input` requires grad.
    """
    no_options = (weight is None and softcap is None and normalize_by is None and reduction == "mean"
                  and inplace_backward is False and type(ignore_index) is int and ignore_index == -100
                  and _is_number(label_smoothing, 0) and _is_number(z_loss, 0) and _is_number(logit_scale, 1))
    if no_options and (plain := _plain_call(input, target)) is not None:
        return plain
    if no_options:  # nothing to convert or check
        opts = DEFAULT_OPTIONS
    else:
        opts = CrossEntropyOptions(check_ignore_index(ignore_index), reduction, float(label_smoothing),
                                   float(z_loss), None if softcap is None else float(softcap), float(logit_scale),
                                   bool(inplace_backward))
    divisor = None
    if normalize_by is not None:
        opts, divisor = _with_normalize_by(opts, normalize_by, input)
    grad_enabled = torch.is_grad_enabled()
    compute_grad = grad_enabled and input.requires_grad if isinstance(input, torch.Tensor) else False
    check_cross_entropy_args(input, target, weight, opts, compute_grad, grad_enabled)
    n_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    out_shape = input.shape[:1] + input.shape[2:] if input.dim() > 1 else ()
    if input.device.type == "meta":  # shapes only: PyTorch's meta loss, in nanfuse's loss dtype, backpropagates
        acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        target = target.to(acc) if target.is_floating_point() else target
        return nn.functional.cross_entropy(input.to(acc), target, None if weight is None else weight.to(acc),
                                           ignore_index=opts.ignore_index, reduction=reduction,
                                           label_smoothing=opts.label_smoothing)
    prob_target = target.is_floating_point()
    if input.dim() == 1:
        logits, flat_target = input.unsqueeze(0), target.unsqueeze(0)
    elif input.dim() == 2:
        logits, flat_target = input, target
    else:  # (N, C, d1, ...): classes last, one row per position
        logits = input.movedim(1, -1).reshape(-1, n_classes)
        flat_target = target.movedim(1, -1).reshape(-1, n_classes) if prob_target else target.reshape(-1)
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        logits = logits.contiguous()
    if prob_target and flat_target.stride(-1) != 1:
        flat_target = flat_target.contiguous()
    if weight is not None:
        weight = weight.contiguous()  # the kernels index it densely
    in_transform = torch._C._functorch.peek_interpreter_stack() is not None  # torch.func: vmap, grad, ...
    if in_transform and opts.inplace_backward and compute_grad:
        raise ValueError("inplace_backward=True is not supported under torch.func transforms (grad, vjp, jacrev): "
                         "pass inplace_backward=False")
    if not prob_target:
        flat_target = flat_target.long().contiguous()  # the kernels read one index per row, densely
        # under vmap: checked per entry by the vmap rule; on the plain path: by forward
        if not in_transform and _check_targets(flat_target) and not (
                not _backend.through_registered_ops() and takes_plain_path(logits, flat_target, weight, opts, divisor)):
            check_target_range(flat_target, n_classes, opts.ignore_index)
    if _backend.through_registered_ops():
        loss = _ops.cross_entropy(logits, flat_target, weight, opts, divisor)
    else:
        # the logits are kept beyond reduction='none' where backward needs them: gradients of probability
        # targets or weights, and torch.func transforms (whose backward must itself be differentiable)
        keep_logits = grad_enabled and (flat_target.requires_grad or (weight is not None and weight.requires_grad)
                                        or in_transform)
        apply = CrossEntropyFunction.apply if in_transform else _apply_without_binding
        loss = apply(logits, flat_target, weight, opts, compute_grad, keep_logits, divisor)[0]
    if reduction == "none":  # one loss per position: (), (N,) or (N, d1, ...)
        return loss.reshape(out_shape)
    return loss


# Function.apply binds its arguments to forward's signature (inspect.signature, ~0.1 ms on a small CPU call) for
# torch.func's sake; outside a transform it then calls this, which every argument given positionally makes safe
_apply_without_binding = super(torch.autograd.Function, CrossEntropyFunction).apply


# At most this many fp32 logits on CPU, the common case is PyTorch's own cross_entropy: the same math as the
# fallback's (class indices in [0, C), -100 rows ignored, the mean over the others), in C++, where on so few
# logits nanfuse's Python costs more than the passes over memory it saves (`nanfuse bench --only overhead`).
# Beyond it the fallback runs, which writes the gradient in forward.
SMALL_CPU_LOGITS = 1 << 16


def _plain_call(input, target):
    """The loss of the common case, or None where this is not it: fp32 CPU logits on the PyTorch path against
    int64 class indices, eagerly. The keyword options are for the caller to check. Skips the general argument
    handling: up to SMALL_CPU_LOGITS, PyTorch's own call checks the rest, and whatever it refuses (a bad index or
    shape) or gets wrong for nanfuse (all rows ignored: NaN; a row sum past fp32's max: inf; the NaN gradient of an
    ignored row with non-finite logits) is redone on the general path, which names the bad argument and keeps the
    loss finite: one host read of the loss, and of the targets' least index where a gradient is recorded; free on
    CPU."""
    if not (isinstance(input, torch.Tensor) and isinstance(target, torch.Tensor) and input.dtype is torch.float32
            and target.dtype is torch.int64 and target.is_cpu and input.layout is torch.strided
            and target.dim() + 1 == input.dim()  # PyTorch takes a (1,) target for (C,) logits, then fails in backward
            and _backend.eager_pytorch_on_cpu(input) and torch._C._functorch.peek_interpreter_stack() is None):
        return None
    if input.numel() <= SMALL_CPU_LOGITS:
        try:
            loss = nn.functional.cross_entropy(input, target)
        except (IndexError, ValueError, RuntimeError):
            return None
        # nll_loss sums the rows before it divides: an inf may be a finite mean; NaN: every row ignored (0 here),
        # or NaN logits (NaN on the general path too)
        if not loss.item() < math.inf:
            return None
        # PyTorch's backward gives an ignored row whose logits hold a NaN or an inf (or are all -inf) a NaN
        # gradient (its log-softmax is NaN, times its upstream 0), where nanfuse gives 0: with a gradient to come,
        # some row ignored (an index below 0: any other was refused) and a non-finite sum of the logits, redo
        if (input.requires_grad and torch.is_grad_enabled() and target.min().item() < 0
                and not math.isfinite(input.sum().item())):
            return None
        return loss
    if (input.dim() == 2 and target.dim() == 1 and input.shape[0] == target.shape[0] and input.stride(1) == 1
            and target.stride(0) == 1):
        compute_grad = input.requires_grad and torch.is_grad_enabled()
        return _apply_without_binding(input, target, None, DEFAULT_OPTIONS, compute_grad, False, None)[0]
    return None


def _is_number(value, default):
    return type(value) in (int, float) and value == default


def _with_normalize_by(opts, normalize_by, input):
    """(opts with a number normalize_by folded in, or the 0-dim tensor to divide by on input's device); a
    ValueError names a bad one. A tensor is used as is (not read: no sync) and not differentiated."""
    if isinstance(normalize_by, torch.Tensor):
        if normalize_by.numel() != 1 or normalize_by.dim() > 1 or normalize_by.is_complex():
            raise ValueError("normalize_by must be a nonzero number or a 0-dim real tensor, got a tensor of shape "
                             f"{tuple(normalize_by.shape)} and dtype {normalize_by.dtype}")
        divisor = normalize_by.detach().reshape(())
        if isinstance(input, torch.Tensor) and divisor.device != input.device:
            divisor = divisor.to(input.device, non_blocking=True)
        return opts, divisor
    if isinstance(normalize_by, bool) or not isinstance(normalize_by, (int, float)) or normalize_by == 0 or not (
            -sys.float_info.max <= normalize_by <= sys.float_info.max):  # False for NaN; an int float() overflows
        raise ValueError(f"normalize_by must be a nonzero finite number or a 0-dim tensor, got {normalize_by!r}")
    return dataclasses.replace(opts, normalize_by=float(normalize_by)), None


def _check_targets(target):
    """Whether class indices are range-checked: where reading them is free (CPU), or on request (one sync)."""
    return _backend.may_read_values(target) or os.environ.get("NANFUSE_CHECK_TARGETS") == "1"


class CrossEntropyLoss(nn.Module):
    """nn.CrossEntropyLoss with nanfuse's fused kernel and its extra options; see cross_entropy."""

    def __init__(self, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *,
                 z_loss=0.0, softcap=None, logit_scale=1.0, inplace_backward=False):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.z_loss, self.softcap, self.logit_scale = z_loss, softcap, logit_scale
        self.inplace_backward = inplace_backward

    def forward(self, input, target):
        return cross_entropy(input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
                             z_loss=self.z_loss, softcap=self.softcap, logit_scale=self.logit_scale,
                             inplace_backward=self.inplace_backward)
