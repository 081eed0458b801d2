"""Softmax-cross-entropy in pure PyTorch: the same math as kernels/cross_entropy.py, for CPU tensors.

Rows are processed in chunks of about CHUNK_ELEMENTS logits, so every temporary is chunk-sized
(it stays in cache) and nothing N x C is made beyond the gradient itself. Per chunk: a fused,
max-subtracted log-softmax, then the loss terms and the gradient written straight into its buffer
(backward of reduction='none' recomputes the chunk's log-softmax). Accumulation is in
fp32 (fp64 for fp64 logits).
"""

import math

import torch

from .._backend import may_read_values

CHUNK_ELEMENTS = 1 << 21


def _row_chunks(n_rows, n_classes):
    rows = max(1, CHUNK_ELEMENTS // max(n_classes, 1))
    for start in range(0, n_rows, rows):
        yield slice(start, min(start + rows, n_rows))


def _acc_dtype(logits):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _transformed(chunk, opts, acc):
    """Scaled, soft-capped logits in the accumulation dtype; may alias `chunk`, so never write to it."""
    x = chunk.to(acc)
    if opts.softcap is not None:
        # -inf stays -inf (tanh(-inf) = -1 would turn a masked class into a finite logit); the scale goes inside
        # tanh in one factor, so a finite logit whose scaled value overflows still caps to +-softcap
        return torch.where(x == float("-inf"), x, opts.softcap * torch.tanh(x * (opts.logit_scale / opts.softcap)))
    if opts.logit_scale != 1.0:
        x = x * opts.logit_scale
    return x


class _RowTargets:
    """Per-row target quantities of one chunk: validity, a_y, A, and the dense a_c."""

    def __init__(self, target, weight, scalars, opts, n_classes, acc, mass=None):
        self.prob = target.dim() == 2
        eps = opts.label_smoothing
        w = None if weight is None else weight.to(acc)
        if self.prob:
            self.valid = self.ok = torch.ones(target.shape[0], dtype=torch.bool, device=target.device)
            self.target_coef = None
            t = target.to(acc)
            self.dense = (1.0 - eps) * t + eps / n_classes
            if w is not None:
                self.dense = self.dense * w
            self.mass = self.dense.sum(1) if mass is None else mass
        else:
            self.valid = target != opts.ignore_index
            in_range = (target >= 0) & (target < n_classes)
            self.ok = self.valid & in_range
            self.y = torch.where(in_range, target, 0).unsqueeze(1)
            w_y = torch.ones((), dtype=acc, device=target.device) if w is None else w[self.y.squeeze(1)]
            self.target_coef = w_y * (1.0 - eps)
            self.dense = None
            if eps > 0:
                self.dense = (eps / n_classes) * (torch.ones((), dtype=acc, device=target.device) if w is None else w)
            self.mass = self.target_coef
            if eps > 0:  # only then: a NaN or Inf weight of a class no target uses must not reach the row
                self.mass = self.mass + eps * scalars[2] / n_classes
        # ignored rows give exactly 0; a non-ignored out-of-range target poisons its row with NaN
        self.fill = torch.where(self.valid, float("nan"), 0.0).to(acc)

    def finish_rows_(self, out):
        """finish() on the rows of `out` in place, touching only the rows that need it where that is free."""
        if may_read_values(self.ok):
            bad = ~self.ok
            if bad.any():
                out[bad] = self.fill[bad].unsqueeze(1).to(out.dtype)
        else:
            out.copy_(self.finish(out))

    def finish(self, value):
        """value for good rows, 0 for ignored rows, NaN for rows with an out-of-range target."""
        ok = self.ok if value.dim() == 1 else self.ok.unsqueeze(1)
        fill = self.fill if value.dim() == 1 else self.fill.unsqueeze(1)
        return torch.where(ok, value, fill)


def _weighted_gap(a, logp, x, lse):
    """a * (lse - x) with lse - x = -logp, finite whenever the exact product fits in fp32: for finite logits
    -logp alone may overflow (x = -3e38 against a max of 3e38), so there it is formed halved."""
    halved = 2.0 * (a * (0.5 * lse - 0.5 * x))
    return torch.where(torch.isinf(logp) & torch.isfinite(x), halved, a * -logp)


def _row_loss(x, logp, lse, rt, ce_scale, z_scale, opts):
    """Normalised row losses of a chunk from its (transformed) logits, log-probabilities and lse (None when
    there are no dense terms, no weight and no z_loss: then a_y = 1 and -logp_y overflows only with the loss)."""
    ce = torch.zeros_like(logp[:, 0])
    if rt.dense is not None:
        ce = torch.where(rt.dense != 0, _weighted_gap(rt.dense, logp, x, lse.unsqueeze(1)), 0.0).sum(1)
    if rt.target_coef is not None:
        logp_y = logp.gather(1, rt.y).squeeze(1)
        if lse is None:
            target_term = -rt.target_coef * logp_y
        else:
            target_term = _weighted_gap(rt.target_coef, logp_y, x.gather(1, rt.y).squeeze(1).to(lse.dtype), lse)
        ce = ce + torch.where(rt.target_coef != 0, target_term, 0.0)
    loss = torch.where(ce_scale != 0, ce_scale * ce, 0.0)
    if opts.z_loss:
        loss = loss + torch.where(z_scale != 0, z_scale * opts.z_loss * lse * lse, 0.0)
    return rt.finish(loss)


def _write_grad(out, p, x, lse, rt, ce_scale, z_scale, opts):
    """out = dloss/dlogits for the chunk from its probabilities p (overwritten), in the accumulation dtype."""
    p_coef = ce_scale * rt.mass
    if opts.z_loss:
        p_coef = p_coef + 2.0 * z_scale * opts.z_loss * lse
    g = torch.mul(p, (p_coef * opts.logit_scale).reshape(-1, 1), out=out if out.dtype == p.dtype else p)
    if rt.dense is not None:
        g.sub_((ce_scale.unsqueeze(-1) if ce_scale.dim() else ce_scale) * opts.logit_scale * rt.dense)
    if rt.target_coef is not None:
        # the target's p - 1, formed in the accumulation dtype before the one store
        g.scatter_add_(1, rt.y, -(ce_scale * rt.target_coef * opts.logit_scale).expand(len(p)).unsqueeze(1))
    if opts.softcap is not None:
        g.mul_(torch.where(x == float("-inf"), 0.0, 1.0 - (x / opts.softcap) ** 2))
    if g is not out:
        out.copy_(g)
    rt.finish_rows_(out)


def _log_probs(chunk, opts, acc):
    """(transformed logits or None when they are the input as is, log-softmax in the accumulation dtype).

    torch.log_softmax subtracts the row max and forms x - max - log(sum exp), exact for large logits.
    """
    if opts.logit_scale == 1.0 and opts.softcap is None:
        return None, torch.log_softmax(chunk, 1, dtype=acc)
    x = _transformed(chunk, opts, acc)
    return x, torch.log_softmax(x, 1)


def empty_stats(logits, target):
    """The row statistics forward saves for backward: rows of lse (with z_loss, weights or dense terms) and A."""
    return torch.empty(2, logits.shape[0], dtype=_acc_dtype(logits), device=logits.device)


def scale_grad(grad, factor):
    """grad * factor out of place (so backward may run again), and no pass at all when factor is 1 on CPU."""
    if may_read_values(factor) and factor.item() == 1.0:  # CPU: reading it costs no sync
        return grad
    return grad * factor  # a 0-dim factor: the product is formed in fp32 (fp64), rounded once to grad's dtype


def plain_mean_forward(logits, target, compute_grad):
    """(mean loss, gradient or None) of fp32 logits against class indices with no option, in eight small ops (one
    read of the logits, one write of the gradient): log-softmax, then the gradient formed in its buffer. None where
    that does not apply: a target outside [0, C) (ignored rows, or a bad index), logits beyond one chunk, or rows
    whose losses sum past fp32's max."""
    n_rows, n_classes = logits.shape
    if not n_rows or n_rows * n_classes > CHUNK_ELEMENTS:
        return None
    low, high = torch.stack(torch.aminmax(target)).tolist()  # CPU only: reading them is free (one read, not two)
    if low < 0 or high >= n_classes:
        return None
    log_p = torch.log_softmax(logits, 1)
    loss = torch.nn.functional.nll_loss(log_p, target)  # the mean of -log p_y over the rows, all valid
    if loss.item() == math.inf:  # nll_loss sums before it divides: the general path's mean of rows may be finite
        return None
    if not compute_grad:
        return loss, None
    inv_rows = 1.0 / n_rows
    grad = log_p.exp_().mul_(inv_rows)  # p / N, then p_y / N - 1 / N
    return loss, grad.scatter_add_(1, target.unsqueeze(1), torch.full((n_rows, 1), -inv_rows))


def cross_entropy_forward(logits, target, weight, scalars, opts, grad=None):
    """Row losses (normalised for the reduction) and row statistics (lse, A) for backward; fills `grad`
    if given. One read of the logits and, with `grad`, one write, chunk by chunk.
    """
    n_rows, n_classes = logits.shape
    acc = _acc_dtype(logits)
    scalars = scalars.to(acc)
    ce_scale, z_scale = scalars[0], scalars[1]
    loss = torch.empty(n_rows, dtype=acc, device=logits.device)
    stats = empty_stats(logits, target).zero_()
    for rows in _row_chunks(n_rows, n_classes):
        x, logp = _log_probs(logits[rows], opts, acc)
        rt = _RowTargets(target[rows], weight, scalars, opts, n_classes, acc)
        lse = None
        if opts.z_loss or rt.dense is not None or weight is not None:  # a target term a_y may be below 1
            lse = torch.logsumexp(logits[rows].to(acc) if x is None else x, 1)
            stats[0, rows] = lse
        loss[rows] = _row_loss(logits[rows] if x is None else x, logp, lse, rt, ce_scale, z_scale, opts)
        stats[1, rows] = rt.mass
        if grad is not None:
            _write_grad(grad[rows], logp.exp_(), x, lse, rt, ce_scale, z_scale, opts)
    return loss, stats


def cross_entropy_backward(logits, target, weight, scalars, opts, stats, grad_output, grad):
    """Gradient of reduction='none' into `grad`, recomputing each chunk's probabilities."""
    n_rows, n_classes = logits.shape
    acc = _acc_dtype(logits)
    scalars = scalars.to(acc)
    for rows in _row_chunks(n_rows, n_classes):
        x, logp = _log_probs(logits[rows], opts, acc)
        rt = _RowTargets(target[rows], weight, scalars, opts, n_classes, acc, mass=stats[1, rows])
        upstream = grad_output[rows].to(acc)
        _write_grad(grad[rows], logp.exp_(), x, stats[0, rows], rt, scalars[0] * upstream, scalars[1] * upstream,
                    opts)
    return grad


def probability_target_grads(logits, target, weight, opts, row_factor, need_target, need_weight):
    """(d loss / d target, d loss / d weight) for probability targets, each None unless asked for, chunk by chunk:
    d/dt_c = f (1 - eps) w_c (lse - x_c) and d/dw_c = sum_rows f ((1 - eps) t_c + eps / C) (lse - x_c), where f
    is the row's upstream factor times the reduction's normaliser (`row_factor`, (N,) or 0-dim)."""
    n_rows, n_classes = logits.shape
    acc = _acc_dtype(logits)
    eps = opts.label_smoothing
    w = None if weight is None else weight.to(acc)
    row_factor = row_factor.to(acc).expand(n_rows)
    d_target = torch.empty_like(target, memory_format=torch.contiguous_format) if need_target else None
    d_weight = torch.zeros(n_classes, dtype=acc, device=logits.device) if need_weight else None
    for rows in _row_chunks(n_rows, n_classes):
        x, logp = _log_probs(logits[rows], opts, acc)
        gap = logp.neg_().mul_(row_factor[rows].unsqueeze(1))  # f (lse - x_c)
        if need_target:
            d_target[rows] = gap * ((1.0 - eps) * (1.0 if w is None else w))
        if need_weight:
            d_weight += (gap * ((1.0 - eps) * target[rows].to(acc) + eps / n_classes)).sum(0)
    return d_target, None if d_weight is None else d_weight.to(weight.dtype)


def differentiable_row_losses(logits, target, weight, scalars, opts):
    """The normalised row losses written with differentiable PyTorch ops (N x C temporaries, no chunking): what
    backward differentiates when it must itself be differentiable (create_graph=True, torch.func)."""
    n_classes = logits.shape[1]
    acc = _acc_dtype(logits)
    scalars = scalars.to(acc)
    x = _transformed(logits, opts, acc)
    lse = torch.logsumexp(x, 1)
    gap = lse.unsqueeze(1) - x
    eps = opts.label_smoothing
    w = None if weight is None else weight.to(acc)
    if target.dim() == 2:
        a = (1.0 - eps) * target.to(acc) + eps / n_classes
        a = a if w is None else a * w
        ce = torch.where(a != 0, a * gap, 0.0).sum(1)
        ok = torch.ones_like(lse, dtype=torch.bool)
    else:
        valid = target != opts.ignore_index
        ok = valid & (target >= 0) & (target < n_classes)
        y = torch.where(ok, target, 0).unsqueeze(1)
        coef = (1.0 - eps) * (torch.ones_like(lse) if w is None else w[y.squeeze(1)])
        ce = torch.where(coef != 0, coef * gap.gather(1, y).squeeze(1), 0.0)
        if eps > 0:
            dense = (eps / n_classes) * (torch.ones_like(x) if w is None else w.expand_as(x))
            ce = ce + torch.where(dense != 0, dense * gap, 0.0).sum(1)
        ce = torch.where(ok | ~valid, ce, float("nan"))
        ok = valid
    loss = torch.where(scalars[0] != 0, scalars[0] * ce, 0.0)
    if opts.z_loss:
        loss = loss + torch.where(scalars[1] != 0, scalars[1] * opts.z_loss * lse * lse, 0.0)
    return torch.where(ok, loss, 0.0)
