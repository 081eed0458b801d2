"""nanfuse.cross_entropy: a drop-in for F.cross_entropy whose forward also writes the gradient.

The logits are streamed once per row (online max-subtracted log-sum-exp in fp32); for reduction
mean/sum the gradient is written in the same pass and is what backward keeps, so the usual
loss.backward() moves two logits-sized passes in all (one read, one write) and no N x C softmax or
fp32 copy is ever kept. Finite logits give a finite loss and gradient.
"""

import dataclasses
import os

import torch
from torch import nn

from . import _backend
from ._checks import check_cross_entropy_args


@dataclasses.dataclass(frozen=True)
class CrossEntropyOptions:
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    logit_scale: float = 1.0
    inplace_backward: bool = False


def _implementation(logits):
    if _backend.uses_triton(logits):
        from .kernels import cross_entropy, scale

        return cross_entropy, scale.scale_
    from .fallback import cross_entropy

    return cross_entropy, _scaled


def _scaled(grad, factor):
    """grad * factor out of place (so backward may run again), and no pass at all when factor is 1 on CPU."""
    if _backend.may_read_values(factor) and factor.item() == 1.0:  # CPU: reading it costs no sync
        return grad
    return grad * factor  # a 0-dim fp32 factor: the product is formed in fp32, rounded once to grad's dtype


def _scalars(target, weight, opts, n_rows, n_classes, dtype):
    """[ce_norm, z_norm, weight_sum] on the device: the reduction's normalisers, computed without a sync."""
    device = target.device
    # torch.full, not torch.tensor: a device fill, where copying a host value to a GPU would sync
    weight_sum = weight.to(dtype).sum() if weight is not None else torch.full((), float(n_classes), device=device)
    one = torch.ones((), dtype=dtype, device=device)
    if opts.reduction != "mean":
        return torch.stack([one, one, weight_sum.to(dtype)])
    if target.dim() == 2:
        ce_den = z_den = torch.full((), float(n_rows), dtype=dtype, device=device)
    else:
        valid = target != opts.ignore_index
        z_den = valid.sum().to(dtype)
        ce_den = z_den
        if weight is not None:
            in_range = torch.where((target >= 0) & (target < n_classes), target, 0)
            ce_den = torch.where(valid, weight.to(dtype)[in_range], 0).sum()

    def inverse(den):  # an empty batch, all targets ignored or a zero total weight: loss 0, not NaN
        return torch.where(den != 0, 1.0 / den, 0.0)

    return torch.stack([inverse(ce_den), inverse(z_den), weight_sum.to(dtype)])


def forward_pass(logits, target, weight, opts, compute_grad):
    """(loss, gradient or None, row statistics, normalisers): the forward shared by the autograd Function
    and the registered op. The gradient is written only for mean/sum and when compute_grad is true.
    """
    impl, _ = _implementation(logits)
    n_rows, n_classes = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    with _backend.no_autocast(logits):
        scalars = _scalars(target, weight, opts, n_rows, n_classes, acc)
        grad = None
        if compute_grad and opts.reduction != "none":
            grad = logits if opts.inplace_backward else torch.empty_like(logits, memory_format=torch.contiguous_format)
        row_loss, stats = impl.cross_entropy_forward(logits, target, weight, scalars, opts, grad)
    return (row_loss if opts.reduction == "none" else row_loss.sum()), grad, stats, scalars


def rows_backward(logits, target, weight, scalars, stats, grad_output, opts):
    """Gradient of reduction='none' for the upstream row gradients, recomputed from the saved statistics."""
    grad = logits if opts.inplace_backward else torch.empty_like(logits, memory_format=torch.contiguous_format)
    with _backend.no_autocast(logits):
        _implementation(logits)[0].cross_entropy_backward(logits, target, weight, scalars, opts, stats,
                                                          grad_output, grad)
    return grad


class CrossEntropyFunction(torch.autograd.Function):
    """Autograd node of cross_entropy on (N, C) logits with contiguous classes (the eager path)."""

    @staticmethod
    def forward(ctx, logits, target, weight, opts):
        loss, grad, stats, scalars = forward_pass(logits, target, weight, opts, ctx.needs_input_grad[0])
        if grad is not None and opts.inplace_backward:
            # the logits now hold the gradient: any op that saved them must fail loudly in backward
            torch.autograd.graph.increment_version(logits)
        ctx.opts, ctx.scale, ctx.backward_done = opts, _implementation(logits)[1], False
        if grad is not None:
            ctx.save_for_backward(grad)
        elif ctx.needs_input_grad[0]:
            ctx.save_for_backward(logits, target, weight, scalars, stats)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        opts = ctx.opts
        if opts.reduction != "none":
            if ctx.backward_done and ctx.scale is not _scaled:
                raise RuntimeError(
                    "nanfuse.cross_entropy: on the Triton path the gradient written in forward is scaled in "
                    "place by backward, so "
                    "it cannot run twice through the same graph (retain_graph=True); use reduction='none' "
                    "and .sum()/.mean() the result instead")
            ctx.backward_done = True
            (grad,) = ctx.saved_tensors
            return ctx.scale(grad, grad_output), None, None, None
        logits, target, weight, scalars, stats = ctx.saved_tensors
        grad = rows_backward(logits, target, weight, scalars, stats, grad_output, opts)
        if opts.inplace_backward:
            torch.autograd.graph.increment_version(logits)
        return grad, None, None, None


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *,
                  z_loss=0.0, softcap=None, logit_scale=1.0, inplace_backward=False):
    """Cross-entropy of logits `input` (class dim 1) against class indices or class probabilities.

    Same arguments and results as torch.nn.functional.cross_entropy, plus `logit_scale` (logits are
    multiplied by it), `softcap` (then softcap * tanh(x / softcap)), `z_loss` (adds z_loss * lse**2 per
    non-ignored row, unweighted) and `inplace_backward` (the gradient overwrites `input`). The loss is
    fp32 (fp64 for fp64 input); an empty or fully ignored batch gives 0.0, not NaN.
    Cost: one read of the logits, plus one write of the gradient when `input` requires grad.
    """
    opts = CrossEntropyOptions(int(ignore_index), reduction, float(label_smoothing), float(z_loss),
                               None if softcap is None else float(softcap), float(logit_scale),
                               bool(inplace_backward))
    check_cross_entropy_args(input, target, weight, opts)
    n_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    prob_target = target.is_floating_point()
    if input.dim() == 1:
        logits, flat_target = input.unsqueeze(0), target.unsqueeze(0)
    elif input.dim() == 2:
        logits, flat_target = input, target
    else:  # (N, C, d1, ...): classes last, one row per position
        logits = input.movedim(1, -1).reshape(-1, n_classes)
        flat_target = target.movedim(1, -1).reshape(-1, n_classes) if prob_target else target.reshape(-1)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if prob_target and flat_target.stride(-1) != 1:
        flat_target = flat_target.contiguous()
    if weight is not None:
        weight = weight.contiguous()  # the kernels index it densely
    if not prob_target:
        flat_target = flat_target.long().contiguous()  # the kernels read one index per row, densely
        if _backend.may_read_values(flat_target) or os.environ.get("NANFUSE_CHECK_TARGETS") == "1":
            _check_target_range(flat_target, n_classes, opts.ignore_index)
    if _backend.through_registered_ops():
        from . import _ops

        loss = _ops.cross_entropy(logits, flat_target, weight, opts)
    else:
        loss = CrossEntropyFunction.apply(logits, flat_target, weight, opts)
    if reduction == "none":  # one loss per position: (), (N,) or (N, d1, ...)
        return loss.reshape(input.shape[:1] + input.shape[2:] if input.dim() > 1 else ())
    return loss


def _check_target_range(target, n_classes, ignore_index):
    """ValueError for a class index outside [0, C) that is not ignore_index (reads the values: one sync on GPU)."""
    bad = ((target < 0) | (target >= n_classes)) & (target != ignore_index)
    if bad.any():
        value = target[bad][0].item()  # CPU, or the NANFUSE_CHECK_TARGETS=1 opt-in
        raise ValueError(f"target contains class index {value}, outside [0, {n_classes}) and not "
                         f"ignore_index={ignore_index}")


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
