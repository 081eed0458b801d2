"""Scale the rows of a gradient by a factor that lives on the device: one read and one write, none when it is
done in place and the factor is exactly 1 (read on the device)."""

import triton
import triton.language as tl

from .common import Launch, warps_for_block

BLOCK_SIZE = 4096


@triton.jit
def _scale_block(x_ptr, out_ptr, factor, row, n_cols, x_row_stride, out_row_stride, BLOCK_SIZE: tl.constexpr):
    cols = tl.program_id(1).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask).to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, (x * factor).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def scale_kernel(
    x_ptr,  # (N, C), classes contiguous, rows x_row_stride apart
    out_ptr,  # (N, C) out, rows out_row_stride apart; x_ptr itself when IN_PLACE
    factor_ptr,  # 0-dim factor on the device
    n_cols, x_row_stride, out_row_stride,
    IN_PLACE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """Grid (N, column blocks): out = x * factor, formed in fp32 and rounded once."""
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2**31 for large N x C
    factor = tl.load(factor_ptr).to(tl.float32)
    if IN_PLACE:
        if factor != 1.0:  # no memory traffic at all for a factor of 1
            _scale_block(x_ptr, out_ptr, factor, row, n_cols, x_row_stride, out_row_stride, BLOCK_SIZE)
    else:
        _scale_block(x_ptr, out_ptr, factor, row, n_cols, x_row_stride, out_row_stride, BLOCK_SIZE)


def plan_scale(x, out, factor):
    """Launches for out = x * factor without a host sync; x, out: (N, C) with contiguous classes and any row
    stride (out may be x: in place), factor: a 0-dim device tensor."""
    n_rows, n_cols = x.shape
    if not x.numel():
        return []
    block_size = min(BLOCK_SIZE, max(16, triton.next_power_of_2(n_cols)))
    return [Launch(scale_kernel, (n_rows, triton.cdiv(n_cols, block_size)), dict(
        x_ptr=x, out_ptr=out, factor_ptr=factor, n_cols=n_cols, x_row_stride=x.stride(0),
        out_row_stride=out.stride(0), IN_PLACE=out is x, BLOCK_SIZE=block_size), warps_for_block(block_size))]
