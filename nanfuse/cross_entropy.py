"""nanfuse.cross_entropy: a drop-in for F.cross_entropy whose forward writes the fp32 gradient.

The logits are streamed once per row (online max-subtracted log-sum-exp in fp32). For fp32 mean/sum the
gradient is written in the same pass and is what backward keeps, so the usual loss.backward() moves two
logits-sized passes in all. fp16/bf16 (and fp64, and reduction='none') keep the logits instead and backward
recomputes the gradient in one read and one write, with the upstream factor folded in before the one
rounding (see writes_grad_in_forward). No N x C softmax or fp32 copy is ever kept. Finite logits give a
finite loss and gradient.
"""

import dataclasses
import os

import torch
from torch import nn

from . import _backend
from ._checks import check_cross_entropy_args, check_ignore_index


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
        from .kernels import cross_entropy

        return cross_entropy
    from .fallback import cross_entropy

    return cross_entropy


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


def writes_grad_in_forward(logits, opts):
    """True where forward writes the gradient and backward only scales it: reduction mean/sum on fp32 logits.

    fp16/bf16 logits keep the logits instead, and backward recomputes the gradient with the upstream factor
    (loss scale, 1/k, 1/num_items) folded in before the one rounding to half precision: a gradient rounded in
    forward and scaled after would be rounded twice (fp16: p/N underflows before a loss scale can lift it).
    fp64 recomputes too, so that double backward and gradgradcheck work. Same memory: the logits are kept
    where the gradient would be; one more read of them.
    """
    return opts.reduction != "none" and logits.dtype == torch.float32


def forward_pass(logits, target, weight, opts, compute_grad):
    """(loss, gradient or None, row statistics, normalisers): the forward shared by the autograd Function
    and the registered op. The gradient is written only where writes_grad_in_forward and compute_grad say so.
    """
    impl = _implementation(logits)
    n_rows, n_classes = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    with _backend.no_autocast(logits):
        scalars = _scalars(target, weight, opts, n_rows, n_classes, acc)
        grad = None
        if compute_grad and writes_grad_in_forward(logits, opts):
            grad = logits if opts.inplace_backward else torch.empty_like(logits, memory_format=torch.contiguous_format)
        row_loss, stats = impl.cross_entropy_forward(logits, target, weight, scalars, opts, grad)
    return (row_loss if opts.reduction == "none" else row_loss.sum()), grad, stats, scalars


def scale_grad(grad, factor, in_place):
    """The gradient forward wrote times the upstream factor, formed in fp32: one read and one write. The Triton
    path works in place when asked (and then skips the pass for a factor of 1, read on the device); the PyTorch
    path works out of place (and skips it then on CPU)."""
    if not _backend.uses_triton(grad):
        from .fallback.cross_entropy import scale_grad as scaled

        return scaled(grad, factor)
    from .kernels import scale

    out = grad if in_place else torch.empty_like(grad, memory_format=torch.contiguous_format)
    for launch in scale.plan_scale(grad, out, factor.to(torch.float32)):
        launch.run()
    return out


def rows_backward(logits, target, weight, scalars, stats, grad_output, opts):
    """The gradient recomputed from the logits and the saved row statistics, for the upstream gradient of each row
    (reduction='none') or of the loss (mean/sum: a 0-dim grad_output, broadcast): one read, one write."""
    grad_output = grad_output.expand(logits.shape[0])
    grad = logits if opts.inplace_backward else torch.empty_like(logits, memory_format=torch.contiguous_format)
    with _backend.no_autocast(logits):
        _implementation(logits).cross_entropy_backward(logits, target, weight, scalars, opts, stats, grad_output,
                                                       grad)
    return grad


def input_grads(logits, target, weight, scalars, opts, d_loss, needs):
    """(d/dtarget, d/dweight) for probability targets, each None unless `needs` asks for it (PyTorch ops)."""
    from .fallback.cross_entropy import probability_target_grads

    row_factor = d_loss * scalars[0].to(d_loss.dtype)  # (N,) for reduction='none' (normaliser 1), else 0-dim
    return probability_target_grads(logits, target, weight, opts, row_factor, needs[1], needs[2])


def differentiable_backward(logits, target, weight, scalars, opts, d_loss, needs, batched=False):
    """(d/dlogits, d/dtarget, d/dweight) as differentiable functions of the inputs and d_loss: backward under
    create_graph=True and torch.func. Forms N x C temporaries in the accumulation dtype. None where autograd
    does not track the inputs and d_loss is not batched (then a first-order gradient of the kernels is all that
    can be asked for)."""
    from .fallback.cross_entropy import differentiable_row_losses

    inputs = [t for t, need in zip((logits, target, weight), needs) if need]

    def rows_of(*needed):
        given = iter(needed)
        args = [next(given) if need else t for t, need in zip((logits, target, weight), needs)]
        return differentiable_row_losses(*args, scalars, opts)

    # torch.func.vjp, not torch.autograd.grad: inside a torch.func transform (jacrev of jacrev) autograd.grad does
    # not see the graph of the transform's level and its gradient would be a silent 0
    with torch.enable_grad(), _backend.no_autocast(logits):
        rows, pullback = torch.func.vjp(rows_of, *inputs)
        if not rows.requires_grad and not batched:  # autograd tracks nothing (torch.func.vjp's function, later)
            return None
        grads = iter(pullback(d_loss.expand_as(rows)))
    return tuple(next(grads) if need else None for need in needs)


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
    def forward(logits, target, weight, opts, compute_grad, keep_logits):
        loss, grad, stats, scalars = forward_pass(logits, target, weight, opts, compute_grad)
        if grad is not None and opts.inplace_backward:
            # the logits now hold the gradient: any op that saved them must fail loudly in backward
            torch.autograd.graph.increment_version(logits)
        return loss, logits.new_empty(0) if grad is None or grad is logits else grad, stats, scalars

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, weight, opts, compute_grad, keep_logits = inputs
        _, grad, stats, scalars = output
        ctx.mark_non_differentiable(grad, stats, scalars)
        ctx.opts, ctx.backward_done = opts, False
        saved_grad = None
        if compute_grad and writes_grad_in_forward(logits, opts):
            saved_grad = logits if opts.inplace_backward else grad
        kept = logits if keep_logits or not writes_grad_in_forward(logits, opts) else None
        ctx.save_for_backward(saved_grad, kept, target, weight, scalars, stats)

    @staticmethod
    def backward(ctx, d_loss, *_):
        opts = ctx.opts
        saved_grad, logits, target, weight, scalars, stats = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        # one upstream gradient per batch entry (vmap of a vjp, is_grads_batched=True): the kernels take one
        functorch = torch._C._functorch
        batched = functorch.is_batchedtensor(d_loss) or functorch.is_legacy_batchedtensor(d_loss)
        if torch.is_grad_enabled() or batched:  # create_graph=True, or torch.func: the gradient must be differentiable
            if logits is None or saved_grad is logits:
                if batched and not torch.is_grad_enabled():  # the gradient written in forward, times each factor
                    return saved_grad * d_loss, None, None, None, None, None
                raise RuntimeError(_NO_DOUBLE_BACKWARD.format(opts.reduction))
            grads = differentiable_backward(logits, target, weight, scalars, opts, d_loss, needs, batched)
            if grads is not None:
                return grads + (None,) * 3
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
        return d_logits, d_target, d_weight, None, None, None

    @staticmethod
    def vmap(info, in_dims, logits, target, weight, opts, compute_grad, keep_logits):
        """torch.vmap: one call per batch entry (a per-sample loss), stacked."""
        def entry(tensor, dim, b):
            return tensor if dim is None or tensor is None else tensor.select(dim, b)

        if not target.is_floating_point() and _check_targets(target):
            _check_target_range(target, logits.shape[-1], opts.ignore_index)
        outputs = [CrossEntropyFunction.apply(*(entry(t, d, b) for t, d in zip((logits, target, weight), in_dims)),
                                              opts, compute_grad, keep_logits) for b in range(info.batch_size)]
        return tuple(torch.stack(column) for column in zip(*outputs)), (0, 0, 0, 0)


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *,
                  z_loss=0.0, softcap=None, logit_scale=1.0, inplace_backward=False):
    """Cross-entropy of logits `input` (class dim 1) against class indices or class probabilities.

    Same arguments and results as torch.nn.functional.cross_entropy, plus `logit_scale` (logits are
    multiplied by it), `softcap` (then softcap * tanh(x / softcap)), `z_loss` (adds z_loss * lse**2 per
    non-ignored row, unweighted) and `inplace_backward` (the gradient overwrites `input`). The loss is
    fp32 (fp64 for fp64 input); an empty or fully ignored batch gives 0.0, not NaN.
    Cost: one read of the logits, plus one write of the gradient when `input` requires grad.
    """
    opts = CrossEntropyOptions(check_ignore_index(ignore_index), reduction, float(label_smoothing), float(z_loss),
                               None if softcap is None else float(softcap), float(logit_scale),
                               bool(inplace_backward))
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
        if not in_transform and _check_targets(flat_target):  # under vmap: checked per entry by the vmap rule
            _check_target_range(flat_target, n_classes, opts.ignore_index)
    if _backend.through_registered_ops():
        from . import _ops

        loss = _ops.cross_entropy(logits, flat_target, weight, opts)
    else:
        # the logits are kept beyond reduction='none' where backward needs them: gradients of probability
        # targets or weights, and torch.func transforms (whose backward must itself be differentiable)
        keep_logits = grad_enabled and (flat_target.requires_grad or (weight is not None and weight.requires_grad)
                                        or in_transform)
        loss = CrossEntropyFunction.apply(logits, flat_target, weight, opts, compute_grad, keep_logits)[0]
    if reduction == "none":  # one loss per position: (), (N,) or (N, d1, ...)
        return loss.reshape(out_shape)
    return loss


def _check_targets(target):
    """Whether class indices are range-checked: where reading them is free (CPU), or on request (one sync)."""
    return _backend.may_read_values(target) or os.environ.get("NANFUSE_CHECK_TARGETS") == "1"


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
