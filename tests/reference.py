"""The float64 oracle: the definitions of nanfuse's ops written plainly, independent of nanfuse's code."""

import torch


def transformed_logits(logits, logit_scale=1.0, softcap=None):
    x = logits.double() * logit_scale
    if softcap is not None:
        x = torch.where(x == float("-inf"), x, softcap * torch.tanh(x / softcap))
    return x


def cross_entropy_ref(logits, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                      z_loss=0.0, softcap=None, logit_scale=1.0, normalize_by=None):
    """Loss of (N, C) logits in float64; differentiable, so its autograd gradient is the reference gradient.
    normalize_by: the result (each row's loss for reduction='none') divided by it."""
    loss = _cross_entropy_ref(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                              logit_scale)
    return loss if normalize_by is None else loss / float(normalize_by)


def _cross_entropy_ref(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                       logit_scale):
    x = transformed_logits(logits, logit_scale, softcap)
    n_rows, n_classes = x.shape
    eps = label_smoothing
    w = torch.ones(n_classes, dtype=torch.float64) if weight is None else weight.double()
    # lse - x_c as (max - x_c) + log sum_c exp(x_c - max): exact even where log(sum) is below an ulp of the max
    # (torch.logsumexp's gradient there would be exp(x - lse) = 1 for every tied maximum). The max is a constant
    # for autograd: the derivative of lse is softmax whatever it is.
    row_max = x.detach().amax(1, keepdim=True).nan_to_num(0.0, 0.0, 0.0) if n_classes else x.detach()[:, :1]
    row_max = torch.where(row_max.isinf(), 0.0, row_max)
    log_sum = torch.log(torch.exp(x - row_max).sum(1, keepdim=True))
    gap = (row_max - x) + log_sum  # lse - x_c
    lse = (row_max + log_sum).squeeze(1)
    if target.is_floating_point():
        a = w * ((1 - eps) * target.double() + eps / n_classes)
        ce = (a * torch.where(a != 0, gap, 0.0)).sum(1)
        valid = torch.ones(n_rows, dtype=torch.bool)
        ce_den = z_den = torch.tensor(float(n_rows), dtype=torch.float64)
    else:
        valid = target != ignore_index
        y = torch.where(valid, target, 0)
        w_y = w[y]
        smooth = ((eps / n_classes) * w * torch.where(w != 0, gap, 0.0)).sum(1) if eps > 0 else 0.0
        target_gap = gap.gather(1, y[:, None]).squeeze(1)
        ce = torch.where(w_y * (1 - eps) != 0, w_y * (1 - eps) * target_gap, 0.0) + smooth
        ce = torch.where(valid, ce, 0.0)
        ce_den = torch.where(valid, w_y, 0.0).sum()
        z_den = valid.sum().double()
    z = torch.where(valid, z_loss * lse**2, 0.0) if z_loss else torch.zeros_like(lse)
    if reduction == "none":
        return ce + z
    if reduction == "sum":
        return ce.sum() + z.sum()
    # each row divided first: the mean of fp64-sized losses fits even where their sum would not
    ce_mean = (ce / ce_den).sum() if ce_den != 0 else ce.sum() * 0.0
    z_mean = (z / z_den).sum() if z_den != 0 else z.sum() * 0.0
    return ce_mean + z_mean


def softmax_ref(x, dim=-1, log=False):
    """(log-)softmax in float64; an all -inf row gives 0 (softmax) or -inf (log_softmax); a row holding NaN or
    +inf is all NaN (as PyTorch: the +inf entry is inf/inf, and the others' share of it undefined)."""
    x = x.double()
    if x.dim() and x.shape[dim] == 0:
        return x.clone()
    # max first, then the log of the sum: x - logsumexp(x) would lose log(sum) next to a max near 3e38
    m = x.amax(dim=dim, keepdim=True)
    shifted = x - torch.where(m.isinf(), 0.0, m)
    log_sum = torch.exp(shifted).sum(dim=dim, keepdim=True).log()
    log_sum = torch.where(log_sum == float("-inf"), 0.0, log_sum)  # an all -inf row
    out = shifted - log_sum if log else torch.exp(shifted - log_sum)
    return torch.where(m == float("inf"), float("nan"), out)


def grad_norm_ref(grads, norm_type=2.0):
    """The p-norm of all gradient values together, in float64 (NaN if any is NaN, else Inf if any is Inf),
    as max |g| * ||g / max|g| ||_p so that no p-th power overflows or underflows (p = 50, values near 1e38)."""
    values = torch.cat([g.detach().double().flatten().cpu() for g in grads]) if grads else torch.zeros(0).double()
    if not values.numel():
        return torch.zeros((), dtype=torch.float64)
    top = values.abs().max()
    if not 0 < top < float("inf"):  # all zero, or a NaN/Inf: the plain norm says so
        return torch.linalg.vector_norm(values, norm_type)
    return top * torch.linalg.vector_norm(values / top, norm_type)


def sanitize_ref(inputs, target, ignore_index=-100, fill=0.0):
    """sanitize_batch, sample by sample: (new inputs, new target, bad-row list), the inputs left unchanged."""
    bad = [i for i in range(target.shape[0]) if any(not torch.isfinite(x[i]).all() for x in inputs)]
    cleaned = [torch.where(torch.isfinite(x), x, torch.tensor(fill, dtype=x.dtype)) for x in inputs]
    new_target = target.clone()
    for i in bad:
        new_target[i] = ignore_index
    return cleaned, new_target, bad
