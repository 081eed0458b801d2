"""The cross-entropy's forward and backward bodies, shared by the autograd Function (nanfuse/cross_entropy.py)
and the registered ops (nanfuse/_ops.py); they call the kernels or the PyTorch fallback.

Forward: one launch for the reduction's normalisers (targets and weights only), one read of the logits, and
for fp32 mean/sum one write of the gradient, already divided by the normaliser and by `normalize_by`.
Backward: nothing over N x C for an upstream factor of exactly 1 (the gradient forward wrote is returned as
is), else one read and one write (a scale, or the recomputation from the logits).
"""

import dataclasses

import torch

from . import _backend
from ._checks import TargetIndexError
from .fallback import cross_entropy as fallback


@dataclasses.dataclass(frozen=True)
class CrossEntropyOptions:
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    logit_scale: float = 1.0
    inplace_backward: bool = False
    normalize_by: float = 1.0  # the reduced loss is divided by it (a number; a device tensor travels apart)


DEFAULT_OPTIONS = CrossEntropyOptions()


def implementation(logits, as_real=False):
    """The module that runs the cross-entropy on `logits`: the Triton kernels or the PyTorch fallback (as_real: the
    one that runs on the real tensor a FakeTensor stands for)."""
    if _backend.uses_triton(logits, as_real):
        from .kernels import cross_entropy

        return cross_entropy
    return fallback


def accumulation_dtype(logits):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def normalizers(logits, target, weight, opts, divisor=None, n_classes=None):
    """[ce_norm, z_norm, weight_sum] on the device, in the accumulation dtype: the reduction's normalisers
    (1 / valid weight and 1 / valid rows for mean, each 0 for a zero total; 1 otherwise), both divided by
    opts.normalize_by and the 0-dim tensor `divisor`, for all rows of `target`. `logits` gives the dtype, the
    device and the path: the whole (N, C) logits, or one chunk of them with `n_classes` given (a caller that
    never forms the whole). Triton: one one-program launch. CPU: read on the host (free there), one small tensor
    made. Elsewhere: PyTorch ops, no sync."""
    n_rows, n_classes = target.shape[0], logits.shape[1] if n_classes is None else n_classes
    dtype = accumulation_dtype(logits)
    mean = opts.reduction == "mean"
    if _backend.uses_triton(logits):
        from .kernels.normalizers import plan_normalizers

        scalars = torch.empty(3, dtype=dtype, device=logits.device)
        plan_normalizers(target, weight, divisor, scalars, n_rows, n_classes, opts.ignore_index, mean,
                         1.0 / opts.normalize_by).run()
        return scalars
    on_host = _backend.may_read_values(target) and (weight is None or _backend.may_read_values(weight))
    if on_host and (divisor is None or _backend.may_read_values(divisor)):
        return _host_normalizers(target, weight, opts, n_rows, n_classes, dtype, divisor)
    return _device_normalizers(target, weight, opts, n_rows, n_classes, dtype, divisor)


def _host_normalizers(target, weight, opts, n_rows, n_classes, dtype, divisor):
    """normalizers() for CPU tensors, with the sums read into Python: two or three small ops in all."""
    weight_sum = float(n_classes) if weight is None else weight.to(dtype).sum().item()
    ce_norm = z_norm = 1.0
    if opts.reduction == "mean":
        if target.dim() == 2:
            ce_den = z_den = float(n_rows)
        else:
            valid = target != opts.ignore_index
            z_den = ce_den = float(valid.sum())
            if weight is not None:
                in_range = torch.where((target >= 0) & (target < n_classes), target, 0)
                ce_den = torch.where(valid, weight.to(dtype)[in_range], 0).sum().item()
        ce_norm = 1.0 / ce_den if ce_den != 0 else 0.0  # an empty batch or zero total weight: loss 0, not NaN
        z_norm = 1.0 / z_den if z_den != 0 else 0.0
    inv = 1.0 / opts.normalize_by
    scalars = torch.tensor([ce_norm * inv, z_norm * inv, weight_sum], dtype=dtype)
    if divisor is not None:
        scalars[:2] /= divisor.to(dtype)
    return scalars


def _device_normalizers(target, weight, opts, n_rows, n_classes, dtype, divisor):
    """normalizers() in PyTorch ops on the device (fp64 on CUDA, the torch backend), without a sync."""
    device = target.device
    # torch.full, not torch.tensor: a device fill, where copying a host value to a GPU would sync
    weight_sum = weight.to(dtype).sum() if weight is not None else torch.full((), float(n_classes), device=device)
    one = torch.ones((), dtype=dtype, device=device)
    if opts.reduction != "mean":
        ce_norm = z_norm = one
    else:
        if target.dim() == 2:
            ce_den = z_den = torch.full((), float(n_rows), dtype=dtype, device=device)
        else:
            valid = target != opts.ignore_index
            z_den = ce_den = valid.sum().to(dtype)
            if weight is not None:
                in_range = torch.where((target >= 0) & (target < n_classes), target, 0)
                ce_den = torch.where(valid, weight.to(dtype)[in_range], 0).sum()
        # an empty batch, all targets ignored or a zero total weight: loss 0, not NaN
        ce_norm, z_norm = (torch.where(den != 0, 1.0 / den, 0.0) for den in (ce_den, z_den))
    norms = torch.stack([ce_norm, z_norm]) * (1.0 / opts.normalize_by)
    if divisor is not None:
        norms = norms / divisor.to(device=device, dtype=dtype)
    return torch.cat([norms, weight_sum.to(dtype).reshape(1)])


def writes_grad_in_forward(logits, opts):
    """True where forward writes the gradient and backward only scales it: reduction mean/sum on fp32 logits.

    fp16/bf16 logits keep the logits instead, and backward recomputes the gradient with the upstream factor
    (loss scale, 1/k, 1/num_items) folded in before the one rounding to half precision: a gradient rounded in
    forward and scaled after would be rounded twice (fp16: p/N underflows before a loss scale can lift it).
    Factors known in forward belong in `normalize_by`, which is folded in there on every dtype.
    fp64 recomputes too, so that double backward and gradgradcheck work. Same memory: the logits are kept
    where the gradient would be; one more read of them.
    """
    return opts.reduction != "none" and logits.dtype == torch.float32


def forward_rows(logits, target, weight, scalars, opts, grad=None):
    """(row losses (N,), already multiplied by the normalisers `scalars`; row statistics for backward) of one
    (N, C) block of logits, writing its gradient into `grad` (N, C) when given (it may be `logits`: in place).
    One read of the logits, one write of `grad`. For callers that split a batch into row chunks (the chunks
    share the batch's `scalars` from normalizers())."""
    with _backend.no_autocast(logits):
        return implementation(logits).cross_entropy_forward(logits, target, weight, scalars, opts, grad)


def takes_plain_path(logits, target, weight, opts, divisor):
    """True for the common case on CPU: fp32 logits, class indices, reduction='mean' and no option; then forward
    checks the targets' range itself (two host reads) and, where all are in [0, C), takes a path of a few ops."""
    return (opts is DEFAULT_OPTIONS and weight is None and divisor is None and logits.dtype == torch.float32
            and target.dim() == 1 and not _backend.uses_triton(logits) and _backend.may_read_values(target))


def check_target_range(target, n_classes, ignore_index):
    """A ValueError that is also PyTorch's IndexError for a class index outside [0, C) that is not ignore_index
    (reads the values: one sync on GPU)."""
    bad = ((target < 0) | (target >= n_classes)) & (target != ignore_index)
    if bad.any():
        value = target[bad][0].item()  # CPU, or the NANFUSE_CHECK_TARGETS=1 opt-in
        raise TargetIndexError(f"target contains class index {value}, outside [0, {n_classes}) and not "
                               f"ignore_index={ignore_index}")


def forward_pass(logits, target, weight, opts, compute_grad, divisor=None, keep_logits=False):
    """(loss, gradient or None, row statistics, normalisers): the forward of the autograd Function and the
    registered op. The gradient is written only where writes_grad_in_forward and compute_grad say so.
    keep_logits: backward may recompute from the logits (torch.func), which needs the statistics and normalisers
    that the plain path does not form."""
    if takes_plain_path(logits, target, weight, opts, divisor) and not _backend.through_registered_ops():
        plain = None if keep_logits else fallback.plain_mean_forward(logits, target, compute_grad)
        if plain is not None:  # row statistics and normalisers: only backward's recomputation needs them
            return plain[0], plain[1], logits.new_empty(0), logits.new_empty(0)
        check_target_range(target, logits.shape[1], opts.ignore_index)
    with _backend.no_autocast(logits):
        scalars = normalizers(logits, target, weight, opts, divisor)
        grad = None
        if compute_grad and writes_grad_in_forward(logits, opts):
            grad = logits if opts.inplace_backward else torch.empty_like(logits, memory_format=torch.contiguous_format)
        row_loss, stats = implementation(logits).cross_entropy_forward(logits, target, weight, scalars, opts, grad)
    return (row_loss if opts.reduction == "none" else row_loss.sum()), grad, stats, scalars


def scale_grad(grad, factor, in_place):
    """The gradient forward wrote times the upstream factor, formed in fp32: one read and one write. The Triton
    path works in place when asked (and then moves nothing for a factor of 1, read on the device by a few
    programs); the PyTorch path works out of place (and returns `grad` itself for a factor of 1 on CPU)."""
    if not _backend.uses_triton(grad):
        return fallback.scale_grad(grad, factor)
    from .kernels import cross_entropy, scale

    out = grad if in_place else torch.empty_like(grad, memory_format=torch.contiguous_format)
    for launch in scale.plan_scale(grad, out, factor.to(torch.float32),
                                   cross_entropy.multiprocessor_count(grad.device)):
        launch.run()
    return out


def rows_backward(logits, target, weight, scalars, stats, grad_output, opts):
    """The gradient recomputed from the logits and the saved row statistics, for the upstream gradient of each row
    (reduction='none') or of the loss (mean/sum: a 0-dim grad_output, broadcast): one read, one write."""
    grad_output = grad_output.expand(logits.shape[0])
    grad = logits if opts.inplace_backward else torch.empty_like(logits, memory_format=torch.contiguous_format)
    with _backend.no_autocast(logits):
        implementation(logits).cross_entropy_backward(logits, target, weight, scalars, opts, stats, grad_output, grad)
    return grad


def input_grads(logits, target, weight, scalars, opts, d_loss, needs):
    """(d/dtarget, d/dweight) for probability targets, each None unless `needs` asks for it (PyTorch ops)."""
    row_factor = d_loss * scalars[0].to(d_loss.dtype)  # (N,) for reduction='none' (normaliser 1), else 0-dim
    return fallback.probability_target_grads(logits, target, weight, opts, row_factor, needs[1], needs[2])


def differentiable_backward(logits, target, weight, scalars, opts, d_loss, needs, batched=False):
    """(d/dlogits, d/dtarget, d/dweight) as differentiable functions of the inputs and d_loss: backward under
    create_graph=True and torch.func. Forms N x C temporaries in the accumulation dtype. None where autograd
    does not track the inputs and d_loss is not batched (then a first-order gradient of the kernels is all that
    can be asked for)."""
    inputs = [t for t, need in zip((logits, target, weight), needs) if need]

    def rows_of(*needed):
        given = iter(needed)
        args = [next(given) if need else t for t, need in zip((logits, target, weight), needs)]
        return fallback.differentiable_row_losses(*args, scalars, opts)

    # torch.func.vjp, not torch.autograd.grad: inside a torch.func transform (jacrev of jacrev) autograd.grad does
    # not see the graph of the transform's level and its gradient would be a silent 0
    with torch.enable_grad(), _backend.no_autocast(logits):
        rows, pullback = torch.func.vjp(rows_of, *inputs)
        if not rows.requires_grad and not batched:  # autograd tracks nothing (torch.func.vjp's function, later)
            return None
        grads = iter(pullback(d_loss.expand_as(rows)))
    return tuple(next(grads) if need else None for need in needs)
