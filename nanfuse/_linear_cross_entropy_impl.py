"""The chunk loop of nanfuse.linear_cross_entropy: cross_entropy(F.linear(input, W, b), target) without the N x V

Rows go through in chunks. Per chunk: one matmul makes its logits (input dtype, fp32 accumulation in the
BLAS), nanfuse's cross-entropy turns them into row losses and overwrites them with their gradient, then two
more matmuls give the chunk's rows of grad_input and add its share to grad_weight (and a column sum to
grad_bias), accumulated in fp32 in a fixed order. So forward does all the N x V work (three matmuls, one
read and one write of each chunk of logits) and keeps only the N x D and V x D gradients; backward scales
them by the upstream factor (free on CPU for a factor of 1, one pass over them otherwise).
reduction='none' cannot fold a per-row upstream gradient into grad_weight ahead of time: its forward makes
only the losses (one matmul) and its backward recomputes each chunk (three matmuls).
Extra memory: one chunk of logits (chunk_rows x V in the input dtype; an fp32 copy of it for a half-precision
weight gradient accumulated in fp32) plus the gradient accumulators.
"""

import torch

from . import _backend

# The cross-entropy internals used here, in one place: the reduction's normalisers and the per-backend row
# kernels (forward_rows; implementation(...).cross_entropy_backward for reduction='none').
from ._cross_entropy_impl import forward_rows, implementation, normalizers

CHUNK_BYTES = 64 << 20  # the default budget for one chunk of logits


def _row_losses(logits, target, weight, scalars, opts, write_grad=True, grad_output=None):
    """Normalised row losses of a chunk of logits, which write_grad overwrites with their gradient. With
    grad_output (reduction='none' backward) the gradient is for each row's upstream factor and no losses are
    returned. The one call into nanfuse.cross_entropy's row kernels."""
    if grad_output is None:
        return forward_rows(logits, target, weight, scalars, opts, logits if write_grad else None)[0]
    _, stats = forward_rows(logits, target, weight, scalars, opts, None)
    implementation(logits).cross_entropy_backward(logits, target, weight, scalars, opts, stats, grad_output, logits)
    return None


def _accumulation_dtype(tensor):
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def default_chunk_rows(n_classes, dtype, budget_bytes=CHUNK_BYTES):
    """Rows per chunk so that one chunk of logits (and its fp32 copy, for half precision) fits budget_bytes."""
    row_bytes = n_classes * (dtype.itemsize + (4 if dtype.itemsize < 4 else 0))
    return max(1, budget_bytes // max(row_bytes, 1))


def _valid_rows(target, opts):
    """(indices of the rows not ignored or None for every row, whether ignored rows must be masked). On CPU
    (reading the count is free) ignored rows are dropped before any matmul. On GPU that count would cost a host
    sync, so every row runs (an ignored row's gradient is exactly 0) and ignored rows' input is masked out of
    grad_weight, where 0 * NaN would be NaN."""
    if target.dim() != 1:
        return None, False
    if not _backend.may_read_values(target):
        return None, True
    valid = target != opts.ignore_index
    if bool(valid.all()):  # CPU: no sync
        return None, False
    return valid.nonzero().squeeze(1), False


def chunked_pass(input, linear_weight, linear_bias, target, weight, opts, scalars, chunk_rows, needs,
                 grad_weight_dtype, grad_output=None, scale=None):
    """(row losses or None, grad_input, grad_weight, grad_bias) of (N, D) input, each gradient None unless
    `needs` asks for it. Forward (grad_output None): gradients for the reduction's normalisers `scalars`,
    grad_input in the input dtype and grad_weight/grad_bias in grad_weight_dtype, summed over chunks in order.
    A half-precision grad_weight_dtype sums each chunk's share times the 0-dim `scale` (so the sum is final:
    an unscaled sum over N rows of order-1 terms would overflow fp16).
    With grad_output (N,): reduction='none' backward, each row's upstream factor folded in by the row kernel.
    """
    n_rows, n_features = input.shape
    n_classes = linear_weight.shape[0]
    dtype = input.dtype
    w = linear_weight.to(dtype)  # a copy only under autocast (an fp32 weight with half-precision input)
    b = None if linear_bias is None else linear_bias.to(dtype)
    need_input, need_weight, need_bias = needs
    grads = need_input or need_weight or need_bias
    rows, mask_ignored = _valid_rows(target, opts)
    n_run = n_rows if rows is None else len(rows)
    acc = _accumulation_dtype(input)
    losses = None
    if grad_output is None:
        losses = torch.zeros(n_rows, dtype=acc, device=input.device)
    grad_input = None
    if need_input:  # ignored rows dropped on CPU keep their zero
        grad_input = torch.empty_like(input) if rows is None else torch.zeros_like(input)
    grad_weight = torch.zeros(linear_weight.shape, dtype=grad_weight_dtype, device=input.device) if need_weight \
        else None
    grad_bias = torch.zeros(n_classes, dtype=grad_weight_dtype, device=input.device) if need_bias else None
    step = max(1, min(chunk_rows, n_run))
    logits_buffer = torch.empty(step, n_classes, dtype=dtype, device=input.device)
    for start in range(0, n_run, step):
        stop = min(start + step, n_run)
        index = None if rows is None else rows[start:stop]
        x = input[start:stop] if index is None else input.index_select(0, index)
        t = target[start:stop] if index is None else target.index_select(0, index)
        logits = logits_buffer[:stop - start]
        if b is None:
            torch.mm(x, w.t(), out=logits)
        else:
            torch.addmm(b, x, w.t(), out=logits)
        if grad_output is None:
            row_loss = _row_losses(logits, t, weight, scalars, opts, write_grad=grads)
            if index is None:
                losses[start:stop] = row_loss
            else:
                losses.index_copy_(0, index, row_loss.to(acc))
        else:
            upstream = grad_output[start:stop] if index is None else grad_output.index_select(0, index)
            _row_losses(logits, t, weight, scalars, opts, grad_output=upstream.to(acc).contiguous())
        if not grads:
            continue
        if need_input:
            if index is None:
                torch.mm(logits, w, out=grad_input[start:stop])
            else:
                grad_input.index_copy_(0, index, torch.mm(logits, w))
        if scale is not None and grad_weight_dtype.itemsize < 4 and (need_weight or need_bias):
            logits.mul_(scale)  # computed in fp32, rounded once: as PyTorch's own half-precision gradient
        if need_weight:
            if mask_ignored:  # an ignored row may hold NaN: keep it out, as on CPU
                x = torch.where((t != opts.ignore_index).unsqueeze(1), x, 0.0)
            if grad_weight.dtype == dtype:
                grad_weight.addmm_(logits.t(), x)
            else:  # fp32 accumulation of half-precision chunks: the products of the exact half values, in fp32
                grad_weight.addmm_(logits.t().to(grad_weight.dtype), x.to(grad_weight.dtype))
        if need_bias:
            grad_bias += logits.sum(0, dtype=grad_bias.dtype)
    return losses, grad_input, grad_weight, grad_bias


def _normalisers(input, target, weight, opts, n_classes):
    """(scalars the row kernel normalises by, scale): for mean and sum, the gradient the kernel writes is
    the true one divided by `scale` (1 / the count of rows for mean), so it stays of order 1 whatever the
    class weights' magnitude (w_y / mean weight) and a half-precision chunk neither underflows (p / N, or
    p * 1e-4 for class weights of 1e-4, in fp16) nor overflows (class weights of 1e4); the losses and
    gradients are multiplied back by `scale`."""
    scalars = normalizers(input, target, weight, opts, n_classes=n_classes)
    ce_norm, z_norm, weight_sum = scalars.unbind()
    scale = torch.where(z_norm != 0, z_norm, 1.0)  # z_norm is 0 only where no row counts (ce_norm 0 too)
    return torch.stack([ce_norm / scale, z_norm / scale, weight_sum]), scale


def finish(held, factor, dtype):
    """A gradient `held` times the 0-dim `factor`, formed in fp32 (fp64) and rounded once to `dtype`: no pass
    on CPU when the factor is 1 and held is already in dtype; fp32 held for a half-precision result goes in
    blocks of rows, so no second held-sized fp32 buffer is made."""
    if held.dtype == dtype:
        if _backend.may_read_values(factor) and factor.item() == 1.0:  # CPU: no sync
            return held
        return held * factor.to(_accumulation_dtype(held))  # half held: computed in fp32, rounded once
    out = torch.empty(held.shape, dtype=dtype, device=held.device)
    step = max(1, (1 << 20) // max(held[0].numel(), 1)) if held.dim() > 1 else max(held.shape[0], 1)
    for start in range(0, held.shape[0], step):
        out[start:start + step] = held[start:start + step] * factor
    return out


def forward_pass(input, linear_weight, linear_bias, target, weight, opts, chunk_rows, fp32_accumulation, needs):
    """(loss, held grad_input, held grad_weight, held grad_bias, scale): the held gradients are for an upstream
    factor of 1; those already in their final dtype (fp32/fp64) are final, the others (half precision) are
    kept unscaled and backward multiplies them by `scale` before their one rounding."""
    n_classes = linear_weight.shape[0]
    acc = _accumulation_dtype(input)
    weight_acc = _accumulation_dtype(linear_weight) if fp32_accumulation else linear_weight.dtype
    with _backend.no_autocast(input):
        if opts.reduction == "none":
            scalars = normalizers(input, target, weight, opts, n_classes=n_classes)
            losses = chunked_pass(input, linear_weight, linear_bias, target, weight, opts, scalars, chunk_rows,
                                  (False, False, False), weight_acc)[0]
            return losses, None, None, None, torch.ones((), dtype=acc, device=input.device)
        scalars, scale = _normalisers(input, target, weight, opts, n_classes)
        losses, grad_input, grad_weight, grad_bias = chunked_pass(
            input, linear_weight, linear_bias, target, weight, opts, scalars, chunk_rows, needs, weight_acc,
            scale=scale)
        loss = losses.sum() * scale
        final = (input.dtype, linear_weight.dtype, linear_weight.dtype)
        held = []
        for grad, dtype in zip((grad_input, grad_weight, grad_bias), final):
            if grad is not None and grad.dtype == dtype and dtype.itemsize >= 4:
                grad.mul_(scale)  # final now: backward is free for an upstream factor of 1
            held.append(grad)
    return (loss, *held, scale)


def backward_pass(kept, target, weight, held, scale, dtypes, opts, chunk_rows, fp32_accumulation, needs, d_loss):
    """(d input, d linear_weight, d linear_bias), None where not needed. mean/sum: the `held` gradients of
    forward_pass times d_loss (and `scale` for those not yet final). none: `kept` = (input, linear_weight,
    linear_bias) and each chunk recomputed with its rows' upstream gradients."""
    final = (dtypes[0], dtypes[1], dtypes[1])
    if opts.reduction == "none":
        input, linear_weight, linear_bias = kept
        with _backend.no_autocast(input):
            weight_acc = _accumulation_dtype(linear_weight) if fp32_accumulation else linear_weight.dtype
            scalars = normalizers(input, target, weight, opts, n_classes=linear_weight.shape[0])
            grads = chunked_pass(input, linear_weight, linear_bias, target, weight, opts, scalars, chunk_rows, needs,
                                 weight_acc, grad_output=d_loss)[1:]
        return tuple(None if g is None else g.to(dtype) for g, dtype in zip(grads, final))
    return tuple(None if not need or grad is None
                 else finish(grad, d_loss if is_final(grad, dtype, role) else scale * d_loss, dtype)
                 for role, (grad, dtype, need) in enumerate(zip(held, final, needs)))


def is_final(held, dtype, role):
    """Whether a held gradient (role 0 input, 1 weight, 2 bias) is already scaled: fp32/fp64 ones held in their
    final dtype (forward_pass scales them) and half-precision weight and bias sums (scaled chunk by chunk)."""
    return held.dtype == dtype and (dtype.itemsize >= 4 or role > 0)
