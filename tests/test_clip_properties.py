"""Property test of the clip over drawn gradient lists: sizes around the kernels' 4096-element blocks, mixed
dtypes, magnitudes per tensor from the dtype's smallest subnormal to its largest finite values, NaN/Inf
injected or not, every kind of norm, max_norm above and below the norm. Checked against the float64
oracle on the run's backend; under NANFUSE_BACKEND=interpret the kernels and the PyTorch path must also
make the same clip and skip decisions."""

import contextlib
import math
import os
from unittest import mock

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import grad_norm_ref

import nanfuse
from nanfuse.fallback import grad_norm as torch_grad_norm

INTERPRETED = os.environ.get("NANFUSE_BACKEND") == "interpret"
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
SIZES = [0, 1, 7, 4095, 4096, 4097, 8193]
NORM_TYPES = [1.0, 2.0, 3.5, 50.0, math.inf]
# the promise the README states: the norm within NORM_RTOL of the float64 norm (rounded to the result dtype),
# or one step of the smallest subnormal where the norm is that small
NORM_RTOL = {torch.float32: 2e-5, torch.float64: 1e-10}


def subnormal_step(dtype):
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


@st.composite
def gradient(draw):
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.sampled_from(SIZES))
    mantissa_bits = {torch.float64: 52, torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[dtype]
    info = torch.finfo(dtype)
    low = math.frexp(info.smallest_normal)[1] - 1 - mantissa_bits  # the smallest subnormal's exponent
    high = math.frexp(info.max)[1] - 1
    if dtype == torch.float64:  # fp64 norms stay inside fp64's range (their saturation is not tested)
        high = 1000
    top = draw(st.integers(low, high))
    spread = draw(st.integers(0, 30))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    exponents = torch.randint(max(low, top - spread), top + 1, (n,), generator=generator).double()
    values = (torch.rand(n, generator=generator, dtype=torch.float64) + 1.0) * torch.exp2(exponents - 1)
    values = torch.where(torch.rand(n, generator=generator) < 0.5, -values, values)
    values = values.clamp(-info.max, info.max).to(dtype)
    bad = draw(st.sampled_from([None, None, math.nan, math.inf, -math.inf]))
    if bad is not None and n:
        values[draw(st.integers(0, n - 1))] = bad
    return values


def clip_coef_ref(norm, max_norm):
    return 1.0 if max_norm is None or not math.isfinite(norm) else min(max_norm / (norm + 1e-6), 1.0)


def run(grads, max_norm, norm_type):
    """(report, clipped copies of the gradients) on the current backend."""
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        params.append(p)
    report = nanfuse.clip_and_check_(params, max_norm, norm_type)
    return report, [p.grad for p in params]


def check_against_reference(grads, max_norm, norm_type, report, clipped, interpreted):
    ref = grad_norm_ref(grads, norm_type).item()
    dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    values = [g.double().flatten() for g in grads]
    n_bad = sum(int((~torch.isfinite(v)).sum()) for v in values)
    assert report.found_inf.dtype == torch.float32 and report.found_inf.item() == float(n_bad > 0)
    assert report.nonfinite_count.item() == n_bad
    assert report.total_norm.dtype == dtype and report.clip_coef.dtype == dtype
    got = report.total_norm.item()
    if not math.isfinite(ref):
        assert (math.isnan(got) and math.isnan(ref)) or got == ref, (got, ref)
    else:
        expected = min(ref, torch.finfo(dtype).max)  # a norm beyond the dtype's range saturates
        tolerance = NORM_RTOL[dtype] * expected + subnormal_step(dtype)
        assert abs(got - expected) <= tolerance, (got, ref, (got - expected) / max(expected, 1e-300))
    coef = clip_coef_ref(ref, max_norm)
    assert (report.clip_coef.item() == 1.0) == (coef == 1.0), (report.clip_coef.item(), coef)
    for old, new in zip(grads, clipped):
        if n_bad or coef == 1.0:  # non-finite gradients, or no clipping needed: left bit-for-bit as they were
            assert torch.equal(old.nan_to_num(), new.nan_to_num()) and torch.equal(old.isnan(), new.isnan())
        else:
            expected = old.double() * coef
            atol = 2 * subnormal_step(old.dtype)
            if interpreted and old.dtype == torch.bfloat16:
                # the Triton interpreter (triton 3.9, runtime/interpreter.py _convert_float) converts fp32
                # subnormals to bf16 wrongly (1.0e-39 -> 5.9e-39); a GPU converts them in hardware
                atol = torch.finfo(torch.float32).smallest_normal
            rtol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2.5e-3}
            # the README's bound: each gradient is multiplied by the coefficient rounded to fp32 (fp64 for fp64
            # gradients, whatever the others), exact to 2**-150 (2**-1075) absolute where that is a subnormal
            floor = subnormal_step(torch.float64 if old.dtype == torch.float64 else torch.float32)
            rtol = rtol[old.dtype] + floor / max(coef, floor)
            torch.testing.assert_close(new.double(), expected, rtol=rtol, atol=atol)


@settings(max_examples=60 if INTERPRETED else 150, deadline=None)
@given(grads=st.lists(gradient(), min_size=1, max_size=4), norm_type=st.sampled_from(NORM_TYPES),
       relation=st.sampled_from([None, 0.25, 4.0]))
def test_clip_matches_the_float64_reference_on_every_input(grads, norm_type, relation):
    ref = grad_norm_ref(grads, norm_type).item()
    max_norm = None if relation is None else (relation * ref if 0 < ref < 1e300 else 1.0)
    report, clipped = run(grads, max_norm, norm_type)
    check_against_reference(grads, max_norm, norm_type, report, clipped, INTERPRETED)
    if INTERPRETED:  # the kernels ran; the PyTorch path must decide the same
        with nanfuse.use_backend("torch"):
            torch_report, torch_clipped = run(grads, max_norm, norm_type)
        check_against_reference(grads, max_norm, norm_type, torch_report, torch_clipped, False)
        assert torch.equal(report.found_inf, torch_report.found_inf)
        assert (report.clip_coef == 1).item() == (torch_report.clip_coef == 1).item()


# the CPU host path (small non-fp64 gradients, norm_type 1, 2 or inf: one fp64 foreach norm read into Python) must
# give what the general path gives: the PyTorch path with the host path turned off (and large half-precision
# gradients widened in parts of 2 * ROW values), or under the interpreter the kernels. Sizes around its limit
# (WHOLE_IN_FP64) and the PyTorch path's rows (ROW); every norm_type, including those the host path leaves alone
HOST_SIZES = [0, 1, 2, 5, 255, 256, 257, 16384, 16385]
HOST_NORM_TYPES = [1.0, 2.0, math.inf, 0.5, 3.0]


@st.composite
def host_gradient(draw):
    """A gradient as `gradient` draws it, of a size around the host path's limits, sometimes strided or all zero."""
    values = draw(gradient())
    n = draw(st.sampled_from(HOST_SIZES))
    if values.numel():
        values = values.repeat(-(-n // values.numel()))[:n]
    else:
        values = torch.zeros(n, dtype=values.dtype)
    layout = draw(st.sampled_from(["contiguous", "contiguous", "strided", "zeros"]))
    if layout == "zeros":
        values = torch.zeros_like(values)
    return values, layout == "strided"


def run_host_or_general(grads, max_norm, norm_type, host, create_graph=False):
    """(report, clipped gradients) through the host path where it applies (host=True) or the general path."""
    params = []
    for g, strided in grads:
        p = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype))
        p.grad = torch.zeros(2 * g.numel(), dtype=g.dtype)[::2] if strided else torch.zeros_like(g)
        p.grad.copy_(g)
        if create_graph:  # as backward(create_graph=True) leaves it: a gradient autograd tracks
            p.grad = p.grad.requires_grad_() * 1
        params.append(p)
    context = contextlib.ExitStack()
    if INTERPRETED:  # the host path is the PyTorch backend's; the general path, the kernels
        if host:
            context.enter_context(nanfuse.use_backend("torch"))
    elif not host:  # the PyTorch path without the host path, half-precision gradients widened 512 values at a time
        context.enter_context(mock.patch.object(torch_grad_norm, "host_norm", lambda grads, norm_type: None))
        context.enter_context(mock.patch.object(torch_grad_norm, "WIDEN_ELEMENTS", 2 * torch_grad_norm.ROW))
    graphs = [p.grad.grad_fn for p in params]
    with context:
        report = nanfuse.clip_and_check_(params, max_norm, norm_type)
    assert [p.grad.grad_fn for p in params] == graphs  # scaled unrecorded, as under torch.no_grad()
    return report, [p.grad.detach() for p in params]


@settings(max_examples=30 if INTERPRETED else 60, deadline=None)
@given(grads=st.lists(host_gradient(), max_size=50), norm_type=st.sampled_from(HOST_NORM_TYPES),
       limit=st.sampled_from([None, 0.25, 4.0, 0.0, math.inf, 1e-30]), create_graph=st.booleans())
def test_the_host_path_gives_what_the_general_path_gives(grads, norm_type, limit, create_graph):
    values = [g for g, _ in grads]
    ref = grad_norm_ref(values, norm_type).item()
    max_norm = limit if limit in (None, 0.0, math.inf, 1e-30) else (limit * ref if 0 < ref < 1e300 else 1.0)
    host, host_clipped = run_host_or_general(grads, max_norm, norm_type, True, create_graph)
    general, general_clipped = run_host_or_general(grads, max_norm, norm_type, False, create_graph)
    for report, clipped, interpreted in ((host, host_clipped, False), (general, general_clipped, INTERPRETED)):
        assert all(t.device.type == "cpu" and t.shape == () and not t.requires_grad for t in report)
        assert report.nonfinite_count.dtype == torch.int64
        check_against_reference(values, max_norm, norm_type, report, clipped, interpreted)
    assert torch.equal(host.found_inf, general.found_inf) and torch.equal(host.nonfinite_count, general.nonfinite_count)
    assert (host.clip_coef == 1).item() == (general.clip_coef == 1).item()
    dtype = host.total_norm.dtype
    torch.testing.assert_close(host.total_norm, general.total_norm, rtol=NORM_RTOL[dtype],
                               atol=subnormal_step(dtype), equal_nan=True)
