"""Property test: nanfuse.softmax / log_softmax on drawn shapes (zero-length dims, rows beyond one block),
dims, dtypes, the dtype= keyword, magnitudes up to the dtype's limits, -inf / +inf / NaN entries and fully
masked rows, against the float64 oracle and, under the interpreter, against the pure-PyTorch path."""

import os

import torch
from helpers import TOLERANCES, assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import softmax_ref

import nanfuse

FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@st.composite
def cases(draw):
    n_dims = draw(st.integers(1, 3))
    shape = [draw(st.sampled_from([0, 1, 2, 3, 5])) for _ in range(n_dims)]
    dim = draw(st.integers(-n_dims, n_dims - 1))
    # the reduced dim: one element, a few, odd sizes, or beyond one 4096-wide block (then few rows, for time)
    shape[dim] = draw(st.sampled_from([0, 1, 2, 7, 33, 1000, 4100]))
    if shape[dim] > 1000:
        shape = [1 if i != dim % n_dims else size for i, size in enumerate(shape)]
    in_dtype = draw(st.sampled_from(FLOATS))
    out_dtype = draw(st.sampled_from([None, *FLOATS]))
    # magnitudes from tiny to the input dtype's limit, or the limit of the dtype it is cast to
    limit = torch.finfo(in_dtype).max if out_dtype is None else min(torch.finfo(in_dtype).max,
                                                                       torch.finfo(out_dtype).max)
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0, 1e4, limit / 4, limit]))
    special = draw(st.sampled_from(["none", "masked_row", "masked_entries", "nan", "posinf"]))
    log, seed = draw(st.booleans()), draw(st.integers(0, 2**31 - 1))
    return tuple(shape), dim, in_dtype, out_dtype, min(scale, limit), special, log, seed


def _input(shape, dim, dtype, scale, special, seed):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).clamp(
        -torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
    if x.numel() == 0 or special == "none":
        return x
    rows = x.movedim(dim, -1)  # a view: writes land in x
    pick = torch.rand(rows.shape, generator=generator) < 0.3
    if special == "masked_row":
        rows[..., :] = torch.where(torch.rand(rows.shape[:-1], generator=generator)[..., None] < 0.5,
                                   float("-inf"), rows)
    else:
        value = {"masked_entries": float("-inf"), "nan": float("nan"), "posinf": float("inf")}[special]
        rows.copy_(torch.where(pick, value, rows))
    return x


@settings(max_examples=60 if not INTERPRETING else 25, deadline=None)
@given(cases())
def test_softmax_matches_the_oracle_and_the_other_path(case):
    shape, dim, in_dtype, out_dtype, scale, special, log, seed = case
    x = _input(shape, dim, in_dtype, scale, special, seed)
    op = nanfuse.log_softmax if log else nanfuse.softmax
    y = op(x, dim=dim, dtype=out_dtype)
    result_dtype = out_dtype or in_dtype
    assert y.dtype == result_dtype and y.shape == x.shape and y.is_contiguous()
    # the oracle on the values the op computes from (x cast to dtype= first), rounded to the output dtype
    expected = softmax_ref(x.to(result_dtype), dim=dim, log=log).to(result_dtype)
    assert_close(y, expected, result_dtype, "output")
    torch_y = (torch.log_softmax if log else torch.softmax)(x, dim, dtype=out_dtype)
    masked_rows = (x.to(result_dtype) == float("-inf")).all(dim, keepdim=True).expand_as(x) if x.dim() else None
    if masked_rows is None or not masked_rows.any():
        # no deviation applies: PyTorch's values, up to PyTorch's own error (its bf16 log_softmax with dtype=
        # can be further from the oracle than our tolerance)
        torch_error = (torch_y.double() - expected.double()).abs().nan_to_num(0.0, posinf=0.0)
        rtol, atol = TOLERANCES[result_dtype]
        atol += torch_error.max().item() if torch_error.numel() else 0.0
        torch.testing.assert_close(y.double(), torch_y.double(), rtol=rtol, atol=atol, equal_nan=True)
    else:  # the documented deviation: a fully masked row is 0 (softmax) or -inf (log_softmax), PyTorch's NaN
        assert torch_y[masked_rows].isnan().all()
        assert (y[masked_rows] == (float("-inf") if log else 0.0)).all()
    if INTERPRETING:
        with nanfuse.use_backend("torch"):
            assert_close(y, op(x, dim=dim, dtype=out_dtype).double(), result_dtype, "interpreter against torch path")


@settings(max_examples=30 if not INTERPRETING else 10, deadline=None)
@given(cases())
def test_softmax_gradient_matches_the_oracle(case):
    shape, dim, in_dtype, out_dtype, scale, special, log, seed = case
    result_dtype = out_dtype or in_dtype
    if result_dtype not in (torch.float32, torch.float64) or in_dtype not in (torch.float32, torch.float64):
        return  # half-precision gradients: test_softmax.py bounds them against PyTorch's own error
    x = _input(shape, dim, in_dtype, min(scale, 1e4), "none", seed).requires_grad_()
    op = nanfuse.log_softmax if log else nanfuse.softmax
    y = op(x, dim=dim, dtype=out_dtype)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=result_dtype)
    (grad,) = torch.autograd.grad(y, x, upstream)
    x_ref = x.detach().double().requires_grad_()
    (grad_ref,) = torch.autograd.grad(softmax_ref(x_ref, dim=dim, log=log), x_ref, upstream.double())
    coarser = max(in_dtype, result_dtype, key=lambda d: TOLERANCES[d][0])
    rtol, atol = TOLERANCES[coarser]
    # dx = y (dy - sum(dy y)) cancels: the error scales with the upstream gradient, not with dx
    scale_of_terms = upstream.abs().max().item() if upstream.numel() else 0.0
    torch.testing.assert_close(grad.double(), grad_ref, rtol=rtol, atol=atol + 4 * rtol * scale_of_terms)
