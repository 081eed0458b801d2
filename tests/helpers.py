"""One comparison helper with tolerances per dtype, shared by every test file."""

import torch

# (rtol, atol) for values nanfuse returns in each dtype. The loss is always computed in fp32 from the
# exact (already rounded) inputs, so it gets the fp32 tolerance. A half-precision gradient is rounded
# twice: when forward writes it in the logits' dtype and when backward scales it by the upstream
# gradient; the Triton interpreter's casts truncate (up to 1 ulp each) where a GPU rounds to nearest.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 2e-6),
    torch.bfloat16: (1.6e-2, 1e-5),  # 2 truncations of an 8-bit mantissa: 2 * 2**-7
    torch.float16: (2.5e-3, 1e-6),  # 2 truncations of an 11-bit mantissa: 2 * 2**-10, plus fp16 subnormals
}


def assert_close(actual, expected, dtype=None, what="value"):
    """actual ~ expected (float64 reference) at the tolerance of `dtype`; NaN/Inf must match exactly."""
    dtype = dtype or actual.dtype
    rtol, atol = TOLERANCES[dtype]
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    nan_mismatch = actual.isnan() != expected.isnan()
    assert not nan_mismatch.any(), f"{what}: NaN at different places, first at {nan_mismatch.nonzero()[:1].tolist()}"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")
