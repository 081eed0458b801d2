"""The cross-entropy reduction's normalisers in one small launch: one program reads the targets (N int64) and
the class weights (C) once, and writes [ce_norm, z_norm, weight_sum], so that forward can fold them into the
loss and the gradient it writes. No read of the logits."""

import triton
import triton.language as tl

from .common import Launch

BLOCK_SIZE = 1024


@triton.jit
def normalizers_kernel(
    target_ptr,  # (N,) int64 class indices; not read for probability targets or a reduction other than mean
    weight_ptr,  # (C,) class weights; not read without HAS_WEIGHT
    divisor_ptr,  # 0-dim tensor the loss is divided by (normalize_by); not read without HAS_DIVISOR
    scalars_ptr,  # (3,) out: [ce_norm, z_norm, weight_sum] in the accumulation dtype
    n_rows, n_classes, ignore_index,
    inv_divisor,  # 1 / normalize_by given as a number (1.0 when none)
    MEAN: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_DIVISOR: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Grid (1,): ce_norm = 1 / (summed weight of valid targets) for mean (1 otherwise), z_norm = 1 / (valid
    rows) for mean (1 otherwise), each 0 for a zero denominator, both divided by normalize_by; weight_sum =
    sum of the class weights (C without weights)."""
    acc_ty = scalars_ptr.dtype.element_ty
    weight_sum = tl.full([], 0.0, acc_ty)
    if HAS_WEIGHT:
        for start in range(0, n_classes, BLOCK_SIZE):
            cols = start + tl.arange(0, BLOCK_SIZE)
            weight_sum += tl.sum(tl.load(weight_ptr + cols, mask=cols < n_classes, other=0.0).to(acc_ty), 0)
    else:
        weight_sum += n_classes
    ce_norm = tl.full([], 1.0, acc_ty)
    z_norm = tl.full([], 1.0, acc_ty)
    if MEAN:
        if PROB_TARGET:
            ce_den = tl.full([], 0.0, acc_ty) + n_rows
            z_den = ce_den
        else:
            valid_rows = tl.full([], 0, tl.int64)
            ce_den = tl.full([], 0.0, acc_ty)
            for start in range(0, n_rows, BLOCK_SIZE):
                rows = start + tl.arange(0, BLOCK_SIZE)
                y = tl.load(target_ptr + rows, mask=rows < n_rows, other=ignore_index)
                valid = y != ignore_index
                valid_rows += tl.sum(valid.to(tl.int64), 0)
                if HAS_WEIGHT:
                    in_range = (y >= 0) & (y < n_classes)
                    w_y = tl.load(weight_ptr + tl.where(in_range, y, 0), mask=valid).to(acc_ty)
                    ce_den += tl.sum(tl.where(valid, w_y, 0.0), 0)
            z_den = valid_rows.to(acc_ty)
            if not HAS_WEIGHT:
                ce_den = z_den
        # an empty batch, all targets ignored or a zero total weight: loss 0, not NaN
        ce_norm = tl.where(ce_den != 0.0, 1.0 / ce_den, 0.0)
        z_norm = tl.where(z_den != 0.0, 1.0 / z_den, 0.0)
    ce_norm = ce_norm * inv_divisor
    z_norm = z_norm * inv_divisor
    if HAS_DIVISOR:
        divisor = tl.load(divisor_ptr).to(acc_ty)
        ce_norm = ce_norm / divisor
        z_norm = z_norm / divisor
    tl.store(scalars_ptr, ce_norm)
    tl.store(scalars_ptr + 1, z_norm)
    tl.store(scalars_ptr + 2, weight_sum)


def plan_normalizers(target, weight, divisor, scalars, n_rows, n_classes, ignore_index, mean, inv_divisor):
    """The one launch that fills `scalars` (3,) with [ce_norm, z_norm, weight_sum]; `divisor` a 0-dim device
    tensor or None."""
    return Launch(normalizers_kernel, (1,), dict(
        target_ptr=target, weight_ptr=scalars if weight is None else weight,
        divisor_ptr=scalars if divisor is None else divisor, scalars_ptr=scalars, n_rows=n_rows,
        n_classes=n_classes, ignore_index=ignore_index, inv_divisor=inv_divisor, MEAN=mean,
        PROB_TARGET=target.dim() == 2, HAS_WEIGHT=weight is not None, HAS_DIVISOR=divisor is not None,
        BLOCK_SIZE=BLOCK_SIZE), 4)
