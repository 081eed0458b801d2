"""Scale a tensor in place by a factor that lives on the device: one read and one write, none if it is 1."""

import triton
import triton.language as tl

from .common import Launch, warps_for_block

BLOCK_SIZE = 4096


@triton.jit
def scale_kernel(x_ptr, factor_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    """x *= factor, in fp32, skipping all memory traffic when factor is exactly 1 (read on the device)."""
    factor = tl.load(factor_ptr).to(tl.float32)
    if factor != 1.0:
        offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offsets < n_elements
        x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
        tl.store(x_ptr + offsets, (x * factor).to(x_ptr.dtype.element_ty), mask=mask)


def plan_scale(x, factor):
    """Launches for x *= factor (a 0-dim device tensor) without a host sync; x contiguous."""
    n = x.numel()
    if not n:
        return []
    return [Launch(scale_kernel, (triton.cdiv(n, BLOCK_SIZE),), dict(x_ptr=x, factor_ptr=factor, n_elements=n,
                                                                     BLOCK_SIZE=BLOCK_SIZE),
                   warps_for_block(BLOCK_SIZE))]


def scale_(x, factor):
    for launch in plan_scale(x, factor):
        launch.run()
    return x
