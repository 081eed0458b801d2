"""nanfuse.linear_cross_entropy against F.linear in float64 then the float64 cross-entropy oracle: every option,
chunk sizes, dtypes, ignored rows, non-finite inputs, memory, determinism, torch.compile and bad arguments."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from helpers import TOLERANCES, assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import cross_entropy_ref
from torch.utils._python_dispatch import TorchDispatchMode

import nanfuse
from nanfuse import _linear_cross_entropy_op, linear_cross_entropy
from nanfuse._backend import registered_ops
from nanfuse.benchmark.measure import peak_extra_bytes

lce_module = importlib.import_module("nanfuse._linear_cross_entropy_impl")  # the chunk loop

OPTIONS = [
    dict(),
    dict(reduction="sum", label_smoothing=0.2),
    dict(reduction="none", z_loss=1e-3, softcap=4.0),
    dict(logit_scale=0.5, z_loss=1e-2, class_weight=True),
    dict(label_smoothing=0.1, ignore_index=3, class_weight=True),
    dict(reduction="none", probabilities=True, label_smoothing=0.1, class_weight=True),
    dict(probabilities=True, softcap=2.0),
]


def make_inputs(n_rows, n_features, n_classes, dtype=torch.float32, bias=False, probabilities=False,
                class_weight=False, ignore_index=-100, ignored=0.2, scale=1.0, lead=None):
    """Random input, weight, bias, target and class weights; a share `ignored` of class-index rows ignored."""
    shape = (n_rows,) if lead is None else lead
    x = (torch.randn(*shape, n_features) * scale).to(dtype)
    w = (torch.randn(n_classes, n_features) / n_features**0.5 * 2).to(dtype)
    b = torch.randn(n_classes).to(dtype) if bias else None
    if probabilities:
        t = torch.softmax(torch.randn(*shape, n_classes) * 2, -1)
    else:
        t = torch.randint(0, n_classes, shape)
        t[torch.rand(shape) < ignored] = ignore_index
    cw = torch.rand(n_classes) + 0.5 if class_weight else None
    return x, w, b, t, cw


def loss_options(opts):
    return {k: v for k, v in opts.items() if k not in ("probabilities", "class_weight")}


def reference(x, w, b, t, cw, upstream, **opts):
    """(loss, d input, d weight, d bias) in float64: F.linear, then the oracle on (N, V) logits."""
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    br = None if b is None else b.detach().double().requires_grad_()
    logits = F.linear(xr, wr, br)
    n_classes = w.shape[0]
    flat_t = t.reshape(-1, n_classes) if t.is_floating_point() else t.reshape(-1)
    loss = cross_entropy_ref(logits.reshape(-1, n_classes), flat_t.double() if t.is_floating_point() else flat_t,
                             None if cw is None else cw.double(), **opts)
    if opts.get("reduction") == "none":
        loss = loss.reshape(t.shape if not t.is_floating_point() else t.shape[:-1])
    loss.backward(upstream.double())
    return loss.detach(), xr.grad, wr.grad, None if br is None else br.grad


def run(x, w, b, t, cw, upstream=None, **opts):
    """(loss, d input, d weight, d bias) of nanfuse; upstream drawn at random when not given."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    loss = linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, **opts)
    if upstream is None:
        upstream = torch.rand(loss.shape) + 0.5
    loss.backward(upstream)
    return (loss.detach(), x.grad, w.grad, None if b is None else b.grad), upstream


def check_against_reference(x, w, b, t, cw, upstream=None, **opts):
    """fp32 results against the float64 reference. The logits are an fp32 matmul, each off by up to about
    D ulps of sum_d |x_d w_d|: the absolute tolerance grows with that magnitude (and with |x| for the weight's
    gradient, and with the upstream factor for the gradients); the relative one is fp32's."""
    got, upstream = run(x, w, b, t, cw, upstream, **opts)
    ref = reference(x, w, b, t, cw, upstream, **{k: v for k, v in opts.items() if k != "chunk_rows"})
    rtol, atol = TOLERANCES[torch.float32]
    logit_size = float((x.abs().reshape(-1, x.shape[-1]) @ w.abs().t()).max()) if x.numel() and w.numel() else 0.0
    atol *= max(1.0, logit_size) * max(1.0, float(x.abs().max()) if x.numel() else 0.0)
    upstream_size = max(1.0, float(upstream.abs().max())) if upstream.numel() else 1.0
    for name, a, e in zip(("loss", "grad input", "grad weight", "grad bias"), got, ref):
        if e is not None:
            assert not (a.isnan() != e.isnan()).any(), f"{name}: NaN at different places"
            scaled = atol if name == "loss" else atol * upstream_size
            torch.testing.assert_close(a.double(), e, rtol=rtol, atol=scaled, equal_nan=True,
                                       msg=lambda m, name=name: f"{name}: {m}")
    return got


@pytest.mark.parametrize("chunk_rows", [4, 1000])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_matches_the_float64_reference(opts, bias, chunk_rows):
    x, w, b, t, cw = make_inputs(13, 8, 37, bias=bias, probabilities=opts.get("probabilities", False),
                                 class_weight=opts.get("class_weight", False),
                                 ignore_index=opts.get("ignore_index", -100))
    check_against_reference(x, w, b, t, cw, chunk_rows=chunk_rows, **loss_options(opts))


@pytest.mark.parametrize("opts", [OPTIONS[0], OPTIONS[3], OPTIONS[5]], ids=str)
def test_one_row_chunks(opts):
    x, w, b, t, cw = make_inputs(7, 5, 19, bias=True, probabilities=opts.get("probabilities", False),
                                 class_weight=opts.get("class_weight", False))
    check_against_reference(x, w, b, t, cw, chunk_rows=1, **loss_options(opts))


@settings(max_examples=20, deadline=None)
@given(n_rows=st.integers(0, 20), n_features=st.integers(1, 12), n_classes=st.integers(1, 40),
       chunk_rows=st.one_of(st.none(), st.integers(1, 25)), bias=st.booleans(), probabilities=st.booleans(),
       class_weight=st.booleans(), reduction=st.sampled_from(["mean", "sum", "none"]),
       label_smoothing=st.sampled_from([0.0, 0.3]), z_loss=st.sampled_from([0.0, 1e-2]),
       softcap=st.sampled_from([None, 3.0]), logit_scale=st.sampled_from([1.0, 0.5]),
       ignored=st.sampled_from([0.0, 0.5, 1.0]), scale=st.sampled_from([0.1, 1.0, 10.0]), seed=st.integers(0, 999))
def test_property_every_option_against_the_reference(n_rows, n_features, n_classes, chunk_rows, bias, probabilities,
                                                    class_weight, reduction, label_smoothing, z_loss, softcap,
                                                    logit_scale, ignored, scale, seed):
    torch.manual_seed(seed)
    x, w, b, t, cw = make_inputs(n_rows, n_features, n_classes, bias=bias, probabilities=probabilities,
                                 class_weight=class_weight, ignored=ignored, scale=scale)
    check_against_reference(x, w, b, t, cw, chunk_rows=chunk_rows, reduction=reduction,
                            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, logit_scale=logit_scale)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_batch_time_input_and_module_form(reduction):
    x, w, b, t, _ = make_inputs(0, 6, 29, bias=True, lead=(3, 5))
    got = check_against_reference(x, w, b, t, None, chunk_rows=4, reduction=reduction)
    assert got[0].shape == (() if reduction == "mean" else (3, 5))
    head = nanfuse.LinearCrossEntropyLoss(6, 29, bias=True, reduction=reduction, chunk_rows=4)
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    torch.testing.assert_close(head(x, t), got[0], rtol=0, atol=0)


@pytest.mark.parametrize("ignored", [0.0, 0.3])
def test_second_backward_through_the_graph_is_right_or_raises(ignored):
    """The gradients forward wrote may become .grad as they are (CPU, factor 1): a second backward through the
    same graph then either adds them again correctly or raises PyTorch's in-place error, never a wrong sum."""
    x, w, _, t, _ = make_inputs(12, 8, 31, ignored=ignored)
    x, w = x.requires_grad_(), w.requires_grad_()
    loss = linear_cross_entropy(x, w, t)
    loss.backward(retain_graph=True)
    first = x.grad.clone(), w.grad.clone()
    try:
        loss.backward()
    except RuntimeError as error:
        assert "inplace" in str(error)
        return
    torch.testing.assert_close(x.grad, 2 * first[0])
    torch.testing.assert_close(w.grad, 2 * first[1])


def test_all_rows_ignored_gives_zero_loss_and_zero_gradients():
    x, w, b, t, _ = make_inputs(9, 5, 11, bias=True, ignored=1.0)
    loss, dx, dw, db = run(x, w, b, t, None, chunk_rows=4)[0]
    assert loss.item() == 0.0  # PyTorch: NaN (0 / 0), as nanfuse.cross_entropy deviates
    assert not dx.any() and not dw.any() and not db.any()


@pytest.mark.parametrize("factor", [1.0, 2.0, 1 / 29, 65536.0])
def test_upstream_factors(factor):
    x, w, b, t, _ = make_inputs(10, 6, 23, bias=True)
    check_against_reference(x, w, b, t, None, torch.tensor(factor), chunk_rows=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opts", [dict(), dict(reduction="none", label_smoothing=0.1, z_loss=1e-3)], ids=str)
def test_half_precision_error_at_most_twice_pytorchs(dtype, opts):
    """Promise: each result's error against the float64 reference is at most 2x that of F.linear + F.cross_entropy
    run in the same dtype (plus the dtype's atol), for the same rounded inputs."""
    x, w, b, t, _ = make_inputs(40, 32, 300, dtype=dtype, bias=True)
    got, upstream = run(x, w, b, t, None, chunk_rows=7, **opts)
    ref = reference(x, w, b, t, None, upstream, **opts)
    xp, wp, bp = (v.clone().requires_grad_() for v in (x, w, b))
    torch_loss = F.cross_entropy(F.linear(xp, wp, bp), t, reduction=opts.get("reduction", "mean"),
                                 label_smoothing=opts.get("label_smoothing", 0.0))
    if opts.get("z_loss"):
        torch_loss = torch_loss + opts["z_loss"] * torch.logsumexp(F.linear(xp, wp, bp).float(), -1) ** 2
    torch_loss.backward(upstream.to(torch_loss.dtype))
    atol = TOLERANCES[dtype][1]
    for name, a, p, e in zip(("loss", "d input", "d weight", "d bias"), got, (torch_loss, xp.grad, wp.grad, bp.grad),
                             ref):
        assert a.dtype == (torch.float32 if name == "loss" else dtype)
        ours = (a.double() - e).abs().max().item()
        theirs = (p.detach().double() - e).abs().max().item()
        assert ours <= 2 * theirs + atol, f"{name}: error {ours:.3g} against PyTorch's {theirs:.3g}"


@pytest.mark.parametrize("class_weight", [1e6, 1e-6])
def test_half_precision_gradients_do_not_depend_on_the_class_weights_magnitude(class_weight):
    """Uniform class weights cancel in the mean: the fp16 chunk's gradient is written relative to the mean class
    weight, so weights of 1e6 do not overflow it to inf and weights of 1e-6 do not flush it to fp16's subnormals."""
    x, w, b, t, _ = make_inputs(40, 16, 50, dtype=torch.float16, bias=True)
    one = torch.tensor(1.0)
    weighted = run(x, w, b, t, torch.full((50,), class_weight), one, chunk_rows=7)[0]
    plain = run(x, w, b, t, None, one, chunk_rows=7)[0]
    for name, a, e in zip(("loss", "d input", "d weight", "d bias"), weighted, plain):
        torch.testing.assert_close(a, e, msg=name)


def test_weight_dtype_accumulation_does_not_overflow_fp16():
    """accumulate_in_weight_dtype=True sums each chunk's share already divided by the row count: an unscaled sum
    over 100 rows of (p - 1) * 1500 passes fp16's 65504, where the true gradient is about -1000."""
    x = (1500 + torch.rand(100, 2)).half()
    w = (torch.randn(3, 2) * 1e-4).half()
    b = torch.randn(3).half()
    t = torch.zeros(100, dtype=torch.long)
    one = torch.tensor(1.0)
    in_half = run(x, w, b, t, None, one, accumulate_in_weight_dtype=True, chunk_rows=40)[0]
    in_fp32 = run(x, w, b, t, None, one, chunk_rows=40)[0]
    for name, a, e in zip(("loss", "d input", "d weight", "d bias"), in_half, in_fp32):
        torch.testing.assert_close(a, e, msg=name)


def test_zero_features_give_the_bias_logits():
    """D = 0: the logits are the bias (or 0), as F.linear makes them."""
    x, w, b, t = torch.randn(6, 0), torch.randn(5, 0), torch.randn(5), torch.randint(0, 5, (6,))
    for bias in (None, b):
        got = run(x, w, bias, t, None, torch.rand(6) + 0.5, reduction="none")
        ref = reference(x, w, bias, t, None, got[1], reduction="none")
        for name, a, e in zip(("loss", "d input", "d weight", "d bias"), got[0], ref):
            if e is not None:
                assert_close(a, e, torch.float32, name)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_meta_tensors_give_meta_results_of_pytorchs_shapes(reduction):
    x = torch.randn(2, 4, 3, device="meta", requires_grad=True)
    w = torch.randn(5, 3, device="meta", requires_grad=True)
    t = torch.zeros(2, 4, dtype=torch.long, device="meta")
    loss = linear_cross_entropy(x, w, t, linear_bias=torch.randn(5, device="meta"), reduction=reduction)
    expected = F.cross_entropy(F.linear(x, w).flatten(0, 1), t.flatten(), reduction=reduction)
    assert loss.device.type == "meta" and loss.numel() == expected.numel()
    loss.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and x.grad.device.type == "meta"


def test_fp32_accumulation_beats_accumulating_in_bf16():
    """The default sums grad_weight in fp32 over the chunks; accumulate_in_weight_dtype=True sums in bf16.
    (The PyTorch row path: 256 one-row chunks through the Triton interpreter take 20 s and test nothing more.)"""
    x, w, _, t, _ = make_inputs(256, 16, 64, dtype=torch.bfloat16, ignored=0.0)
    upstream = torch.tensor(1.0)
    ref = reference(x, w, None, t, None, upstream)[2]
    with nanfuse.use_backend("torch"):
        fp32 = run(x, w, None, t, None, upstream, chunk_rows=1)[0][2]
        in_bf16 = run(x, w, None, t, None, upstream, chunk_rows=1, accumulate_in_weight_dtype=True)[0][2]
    assert fp32.dtype == in_bf16.dtype == torch.bfloat16
    assert (fp32.double() - ref).norm() * 2 < (in_bf16.double() - ref).norm()


def test_grad_weight_is_bit_identical_across_runs():
    x, w, b, t, _ = make_inputs(64, 32, 300, bias=True)
    first = run(x, w, b, t, None, torch.tensor(1.0), chunk_rows=7)[0]
    second = run(x, w, b, t, None, torch.tensor(1.0), chunk_rows=7)[0]
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_in_float64(reduction):
    x, w, b, t, cw = make_inputs(7, 4, 9, dtype=torch.float64, bias=True, class_weight=True)
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
    torch.autograd.gradcheck(lambda x, w, b: linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, chunk_rows=3,
                                                                  reduction=reduction, label_smoothing=0.1,
                                                                  z_loss=1e-2, softcap=3.0), args)


class _MatmulRows(TorchDispatchMode):
    """Rows of every matmul's first operand: the matmul work done."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):  # also the out= forms
            self.rows.append((args[0] if packet is torch.ops.aten.mm else args[1]).shape[0])
        return func(*args, **(kwargs or {}))


def test_ignored_rows_cost_no_matmul_on_cpu():
    x, w, _, t, _ = make_inputs(100, 8, 50, ignored=0.0)
    t[10:] = -100
    x = x.requires_grad_()
    with _MatmulRows() as seen:
        linear_cross_entropy(x, w.requires_grad_(), t, chunk_rows=4).backward()
    # per chunk: logits (4 rows), grad_input (4 rows), grad_weight (V rows of logits^T): 10 valid rows, 3 chunks
    assert sum(r for r in seen.rows if r != 50) == 2 * 10
    assert len(seen.rows) == 3 * 3


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_without_grad_only_the_logits_matmul_runs(context):
    x, w, _, t, _ = make_inputs(12, 8, 50, ignored=0.0)
    with context(), _MatmulRows() as seen:
        loss = linear_cross_entropy(x.requires_grad_(), w.requires_grad_(), t, chunk_rows=4)
    assert seen.rows == [4, 4, 4]
    check_against_reference(x.detach(), w.detach(), None, t, None, torch.tensor(1.0))
    assert loss.item() == pytest.approx(F.cross_entropy(F.linear(x, w), t).item(), rel=1e-5)


def test_peak_memory_is_one_chunk_not_the_logits():
    """Peak heap growth of forward+backward (glibc, sampled at every aten op) stays below a third of the
    N x V logits; F.linear + F.cross_entropy needs more than the logits (so this measure can fail). The PyTorch
    row path: the Triton interpreter's own buffers are not the op's."""
    x, w, _, t, _ = make_inputs(512, 64, 8192)
    x, w = x.requires_grad_(), w.requires_grad_()
    logits_bytes = 512 * 8192 * 4  # 16 MiB

    def ours():
        linear_cross_entropy(x, w, t, chunk_rows=32).backward()

    def torchs():
        F.cross_entropy(F.linear(x, w), t).backward()

    with nanfuse.use_backend("torch"):
        ours()  # warm-up: the BLAS's first-call buffers are not the op's
        peak, _ = peak_extra_bytes(ours, torch.device("cpu"))
    if peak is None:
        pytest.skip("no mallinfo2 on this platform")
    # 2 MiB of fp32 grad_weight, 1 MiB of chunk, the CE's chunk temporaries
    assert peak < logits_bytes / 3, f"peak {peak / 2**20:.1f} MiB"
    torchs()
    assert peak_extra_bytes(torchs, torch.device("cpu"))[0] > logits_bytes


def test_default_chunk_fits_the_budget():
    assert lce_module.default_chunk_rows(32000, torch.float32) * 32000 * 4 <= lce_module.CHUNK_BYTES
    assert lce_module.default_chunk_rows(128256, torch.bfloat16) * 128256 * 6 <= lce_module.CHUNK_BYTES
    assert lce_module.default_chunk_rows(1 << 30, torch.float32) == 1


@pytest.mark.parametrize("compact", [True, False], ids=["cpu rows dropped", "every row run (GPU)"])
def test_nan_in_one_row_poisons_its_loss_and_grad_weight_only(compact, monkeypatch):
    if not compact:
        monkeypatch.setattr(lce_module, "_valid_rows", lambda target, opts: (None, True))
    x, w, b, t, _ = make_inputs(12, 6, 19, bias=True, ignored=0.0)
    t[7] = -100
    x[3, 2] = float("nan")
    x[7, 1] = float("nan")  # an ignored row: never seen, as nanfuse.cross_entropy ignores its logits
    loss, dx, dw, db = run(x, w, b, t, None, torch.ones(12), chunk_rows=5, reduction="none")[0]
    assert loss[3].isnan() and loss[7] == 0 and loss[torch.arange(12) != 3].isfinite().all()
    assert dw.isnan().any() and db.isnan().any()
    assert dx[3].isnan().all() and dx[torch.arange(12) != 3].isfinite().all()
    assert not dx[7].any()
    mean_loss, *_ = run(x, w, b, t, None, torch.tensor(1.0), chunk_rows=5)[0]
    assert mean_loss.isnan()
    clean = torch.arange(12) != 3
    x_clean, t_clean = x[clean].clone(), t[clean]
    x_clean[6] = 0.0  # row 7 (ignored) shifted by one: its values must not matter
    ref = reference(x_clean, w, b, t_clean, None, torch.ones(11), reduction="none")
    assert_close(loss[clean], ref[0], what="other rows' losses")


@pytest.mark.parametrize("compact", [True, False], ids=["cpu rows dropped", "every row run (GPU)"])
def test_nan_in_an_ignored_row_changes_nothing(compact, monkeypatch):
    """An ignored row never contributes: not to the loss, not to grad_weight (on GPU its input is masked out of
    the weight's matmul, where 0 * NaN would be NaN)."""
    if not compact:
        monkeypatch.setattr(lce_module, "_valid_rows", lambda target, opts: (None, True))
    x, w, b, t, _ = make_inputs(10, 6, 19, bias=True, ignored=0.0)
    t[4] = -100
    clean = x.clone()
    clean[4] = 0.0
    x[4] = float("nan")
    got = run(x, w, b, t, None, torch.tensor(1.0), chunk_rows=3)[0]
    expected = run(clean, w, b, t, None, torch.tensor(1.0), chunk_rows=3)[0]
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)


def test_out_of_range_class_index_is_a_value_error_on_cpu():
    x, w, _, t, _ = make_inputs(4, 3, 5, ignored=0.0)
    t[1] = 5
    with pytest.raises(ValueError, match="target"):
        linear_cross_entropy(x, w, t)


def test_autocast_takes_half_input_as_is_and_keeps_an_fp32_weight_gradient():
    """bf16 input and fp32 weight under autocast: matmuls in bf16, the weight's gradient fp32 and no less exact
    than F.linear + F.cross_entropy under autocast (at most 2x its error against float64)."""
    x, w, b, t, _ = make_inputs(16, 8, 40, bias=True)
    w, b = w.requires_grad_(), b.requires_grad_()
    x_half = x.to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(x_half, w, t, linear_bias=b, chunk_rows=5)
    loss.backward()
    assert loss.dtype == torch.float32 and x_half.grad.dtype == torch.bfloat16
    assert w.grad.dtype == b.grad.dtype == torch.float32
    wp, bp = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch_loss = F.cross_entropy(F.linear(x_half.detach(), wp, bp), t)
    torch_loss.backward()
    ref = reference(x_half, w.to(torch.bfloat16), b.to(torch.bfloat16), t, None, torch.tensor(1.0))
    for name, ours, theirs, exact in (("loss", loss, torch_loss, ref[0]), ("d weight", w.grad, wp.grad, ref[2]),
                                      ("d bias", b.grad, bp.grad, ref[3])):
        error, torch_error = ((v.detach().double() - exact).abs().max().item() for v in (ours, theirs))
        assert error <= 2 * torch_error + 1e-6, f"{name}: {error:.3g} against PyTorch's {torch_error:.3g}"
    x32 = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 input: cast as F.linear would
        linear_cross_entropy(x32, w, t, linear_bias=b).backward()
    assert x32.grad.dtype == torch.float32


# ---------------------------------------------------------------- torch.compile and the registered op

@pytest.mark.parametrize("opts", [dict(), dict(reduction="none", z_loss=1e-3), dict(reduction="sum",
                                                                                  probabilities=True)], ids=str)
def test_ops_pass_opcheck(opts):
    x, w, b, t, _ = make_inputs(6, 5, 17, bias=True, probabilities=opts.get("probabilities", False))
    reduction = opts.get("reduction", "mean")
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), t, None, -100, reduction, 0.0,
            opts.get("z_loss", 0.0), None, 1.0, 4, True, True, True, True)
    torch.library.opcheck(_linear_cross_entropy_op._forward, args)
    if reduction == "none":
        torch.library.opcheck(_linear_cross_entropy_op._backward_none,
                              (x.detach(), w.detach(), b.detach(), t, None, torch.rand(6), -100, 0.0, 1e-3, None, 1.0,
                               4, True, True, True, True))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_registered_op_path_matches_the_reference(reduction):
    x, w, b, t, _ = make_inputs(11, 6, 23, bias=True)
    with registered_ops():
        check_against_reference(x, w, b, t, None, chunk_rows=4, reduction=reduction)


def test_compiles_without_graph_break_and_matches_eager():
    x, w, b, t, _ = make_inputs(12, 8, 31, bias=True)

    def step(x, w, b):
        return linear_cross_entropy(torch.tanh(x), w, t, linear_bias=b, chunk_rows=5, z_loss=1e-3)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    leaves = [v.clone().requires_grad_() for v in (x, w, b)]
    compiled(*leaves).backward()
    eager = [v.clone().requires_grad_() for v in (x, w, b)]
    loss = step(*eager)
    loss.backward()
    torch.testing.assert_close(compiled(*leaves), loss)
    for a, e in zip(leaves, eager):
        torch.testing.assert_close(a.grad, e.grad)


# ---------------------------------------------------------------- bad arguments

def test_bad_arguments_raise_pytorchs_exception_class_naming_the_argument():
    x, w, b, t, _ = make_inputs(4, 3, 5, bias=True, ignored=0.0)
    cases = [
        (dict(linear_weight=torch.randn(5, 4)), "linear_weight", F.linear, (x, torch.randn(5, 4))),
        (dict(linear_weight=w.double()), "linear_weight", F.linear, (x, w.double())),
        (dict(linear_bias=torch.randn(6)), "linear_bias", F.linear, (x, w, torch.randn(6))),
        (dict(target=t[:3]), "target", None, None),
    ]
    for override, name, torch_fn, torch_args in cases:
        args = dict(input=x, linear_weight=w, target=t, linear_bias=b) | override
        with pytest.raises(RuntimeError, match=name):
            linear_cross_entropy(args.pop("input"), args.pop("linear_weight"), args.pop("target"), **args)
        if torch_fn is not None:
            with pytest.raises(RuntimeError):
                torch_fn(*torch_args)
    for kwargs, error, name in [(dict(reduction="avg"), ValueError, "reduction"),
                                (dict(chunk_rows=0), ValueError, "chunk_rows"),
                                (dict(label_smoothing=1.5), RuntimeError, "label_smoothing"),
                                (dict(ignore_index=1.5), TypeError, "ignore_index"),
                                (dict(softcap=0.0), ValueError, "softcap"),
                                (dict(weight=torch.rand(4)), RuntimeError, "weight")]:
        with pytest.raises(error, match=name):
            linear_cross_entropy(x, w, t, **kwargs)
    integer = dict(input=x.long(), linear_weight=w.long(), linear_bias=b.long())
    for name, value in integer.items():  # F.linear's RuntimeError, and a TypeError
        args = dict(input=x, linear_weight=w, linear_bias=b) | {name: value}
        for error in (TypeError, RuntimeError):
            with pytest.raises(error, match=name):
                linear_cross_entropy(args["input"], args["linear_weight"], t, linear_bias=args["linear_bias"])
        with pytest.raises(RuntimeError):
            F.linear(args["input"], args["linear_weight"], args["linear_bias"])
    with pytest.raises(ValueError, match="target"):
        linear_cross_entropy(x, w, torch.softmax(torch.randn(4, 5), 1).requires_grad_())
    with pytest.raises(RuntimeError, match="weight"):  # as F.cross_entropy with class indices
        linear_cross_entropy(x, w, t, weight=torch.rand(5, requires_grad=True))
