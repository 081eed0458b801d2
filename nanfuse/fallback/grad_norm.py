"""Global gradient norm with non-finite check in pure PyTorch: the CPU path of kernels/grad_norm.py.

Same outputs and numerics: fp32 result, norms of finite values scaled by their max so 1e20-sized
fp32 gradients do not overflow, NaN/Inf counted. In eager mode on CPU (where reading a value is
free) the per-tensor norms come from one fused foreach pass (G bytes read) and only tensors whose
norm is not finite are looked at again; elsewhere (CUDA with NANFUSE_BACKEND=torch, or under
torch.compile) every tensor takes the branch-free scaled path.
"""

import torch

from .._backend import may_read_values


def _scaled_norm(values, norm_type):
    """p-norm of a tensor of magnitudes >= 0, computed as max * ||values / max||_p so it cannot overflow."""
    top = values.amax() if values.numel() else values.new_zeros(())
    if norm_type == float("inf"):
        return top
    safe = torch.where(top > 0, top, 1.0)
    return torch.where(top > 0, top * torch.linalg.vector_norm(values / safe, norm_type), 0.0)


def _robust_norms(grads, norm_type, may_branch):
    """Per tensor: norm of its finite values (fp32, scaled so it cannot overflow), NaN count, Inf count."""
    norms, nans, infs = [], [], []
    for g in grads:
        g = g.detach()
        nans.append(torch.isnan(g).sum())
        infs.append(torch.isinf(g).sum())
        finite = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0).flatten()
        norm = torch.linalg.vector_norm(finite, norm_type, dtype=torch.float32) if may_branch else None
        if norm is None or not torch.isfinite(norm):  # finite values whose p-th powers overflowed
            norm = _scaled_norm(finite.abs().to(torch.float32), norm_type)
        norms.append(norm)
    return norms, nans, infs


def tensor_norms(grads, norm_type):
    """(finite norms (T,) fp32, NaN counts (T,), Inf counts (T,)) of gradients on one device."""
    device = grads[0].device
    if not may_read_values(grads[0]):
        norms, nans, infs = _robust_norms(grads, norm_type, may_branch=False)
        return torch.stack(norms), torch.stack(nans), torch.stack(infs)
    norms = torch.stack(torch._foreach_norm(grads, norm_type, dtype=torch.float32))
    nans = torch.zeros(len(grads), dtype=torch.int64, device=device)
    infs = torch.zeros(len(grads), dtype=torch.int64, device=device)
    suspects = (~torch.isfinite(norms)).nonzero().flatten().tolist()  # CPU, eager: reading is free
    if suspects:  # a NaN/Inf, or finite values whose p-th powers overflowed: look again, scaled
        again = _robust_norms([grads[i] for i in suspects], norm_type, may_branch=True)
        for slot, (norm, nan, inf) in zip(suspects, zip(*again)):
            norms[slot], nans[slot], infs[slot] = norm, nan, inf
    return norms, nans, infs


def grad_norm(grads, max_norm, norm_type):
    """(result fp32[4]: norm, coef, found_inf, finite norm; counts int64[2]: NaN, Inf) of one device's grads."""
    grads = [g for g in grads if g.numel()]
    if not grads:
        return finish(torch.zeros(()), torch.zeros(2, dtype=torch.int64), max_norm)
    norms, nans, infs = tensor_norms(grads, norm_type)
    return finish(_scaled_norm(norms, norm_type), torch.stack([nans.sum(), infs.sum()]), max_norm)


def finish(finite_norm, counts, max_norm):
    """Norm, clip coefficient and flag from the norm of the finite values and the NaN/Inf counts."""
    norm = torch.where(counts[0] > 0, float("nan"), torch.where(counts[1] > 0, float("inf"), finite_norm))
    found_inf = (counts.sum() > 0).to(torch.float32)
    coef = torch.ones_like(finite_norm)
    if max_norm is not None:
        coef = torch.where(found_inf == 0, torch.clamp(max_norm / (norm + 1e-6), max=1.0), 1.0)
    return torch.stack([norm, coef, found_inf, finite_norm]).to(torch.float32), counts


def scale_(grads, coef):
    """Multiply the gradients by the 0-dim coef in place; skipped when it is 1 and reading it is free."""
    if may_read_values(coef) and coef.item() == 1.0:  # CPU, eager: reading is free and skips a pass
        return
    torch._foreach_mul_(grads, coef)
