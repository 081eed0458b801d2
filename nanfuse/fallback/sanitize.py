"""Batch sanitizing in pure PyTorch: the CPU path of kernels/sanitize.py (same result, two passes)."""

import torch


def sanitize_(x, bad_rows, fill):
    """Replace the NaN/Inf values of x (dim 0 = sample) by `fill` in place and set bad_rows (uint8 (N,)) to 1
    for the samples that held one. Passes: a read for the non-finite mask, a masked write."""
    nonfinite = ~torch.isfinite(x)
    bad_rows.logical_or_(nonfinite.reshape(x.shape[0], -1).any(1))
    x.masked_fill_(nonfinite, fill)
    return x
