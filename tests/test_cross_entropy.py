"""nanfuse.cross_entropy against the float64 oracle, on whichever backend the run selects.

Run as is, CPU tensors take the pure-PyTorch path; with NANFUSE_BACKEND=interpret they run the
Triton kernels through the interpreter; on a GPU machine the "cuda" cases run the compiled kernels.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import cross_entropy_ref

import nanfuse
from nanfuse._backend import registered_ops
from nanfuse.cross_entropy import CrossEntropyFunction, CrossEntropyOptions

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# C = 1 and 2: degenerate rows; 1001: not a power of two, padding lanes in the last block;
# 4097: one element past a whole 4096-wide block; 70,000 with 2 rows: > 65,536 and split across programs.
SHAPES = [(5, 1), (7, 2), (6, 1001), (3, 4097), (2, 70_000)]


def random_targets(n_rows, n_classes, device, ignore_index=-100, n_ignored=1):
    target = torch.randint(0, n_classes, (n_rows,), device=device)
    target[:n_ignored] = ignore_index
    return target


def run(logits, target, upstream=None, **kwargs):
    """nanfuse loss and the gradient for a random upstream gradient (never 1)."""
    x = logits.detach().clone().requires_grad_()
    loss = nanfuse.cross_entropy(x, target, **kwargs)
    upstream = torch.rand_like(loss) + 0.5 if upstream is None else upstream
    loss.backward(upstream)
    return loss, x.grad, upstream


def reference(logits, target, upstream, **kwargs):
    x = logits.detach().cpu().double().requires_grad_()
    loss = cross_entropy_ref(x, target.cpu(), **{k: v.cpu() if torch.is_tensor(v) else v for k, v in kwargs.items()})
    loss.backward(upstream.detach().cpu().double())
    return loss, x.grad


def check(logits, target, **kwargs):
    loss, grad, upstream = run(logits, target, **kwargs)
    kwargs.pop("inplace_backward", None)
    ref_loss, ref_grad = reference(logits, target, upstream, **kwargs)
    assert loss.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert grad.dtype == logits.dtype
    assert_close(loss, ref_loss, torch.float32 if logits.dtype != torch.float64 else torch.float64, "loss")
    assert_close(grad, ref_grad, logits.dtype, "grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_reference(shape, dtype, reduction, device):
    n_rows, n_classes = shape
    logits = (torch.randn(shape, device=device) * 4).to(dtype)
    check(logits, random_targets(n_rows, n_classes, device), reduction=reduction)


OPTIONS = [
    dict(reduction="sum"),
    dict(label_smoothing=0.1),
    dict(weight="rand"),
    dict(weight="rand", label_smoothing=0.2),
    dict(weight="rand", label_smoothing=0.3, reduction="none"),
    dict(ignore_index=3),  # an ignore_index inside [0, C)
    dict(z_loss=1e-3),
    dict(z_loss=1e-2, reduction="none"),
    dict(softcap=5.0),
    dict(logit_scale=0.7),
    dict(logit_scale=2.5, softcap=3.0, z_loss=1e-3, label_smoothing=0.1, weight="rand"),
    dict(logit_scale=2.5, softcap=3.0, z_loss=1e-3, label_smoothing=0.1, weight="rand", reduction="none"),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("shape", [(9, 1001), (2, 9000)])
def test_options_match_reference(options, shape, device):
    options = dict(options)
    n_rows, n_classes = shape
    if options.get("weight") == "rand":
        options["weight"] = torch.rand(n_classes, device=device) + 0.1
    logits = torch.randn(shape, device=device) * 3
    target = random_targets(n_rows, n_classes, device, ignore_index=options.get("ignore_index", -100), n_ignored=2)
    check(logits, target, **options)


PROBABILITY_OPTIONS = [dict(), dict(weight="rand", label_smoothing=0.2), dict(z_loss=1e-3, reduction="sum"),
                       dict(reduction="none", softcap=4.0, weight="rand")]


@pytest.mark.parametrize("options", PROBABILITY_OPTIONS, ids=str)
@pytest.mark.parametrize("shape", [(6, 1001), (2, 9000)])
def test_probability_targets(options, shape, device):
    options = dict(options)
    if options.get("weight") == "rand":
        options["weight"] = torch.rand(shape[1], device=device)
    logits = torch.randn(shape, device=device) * 3
    probs = torch.softmax(torch.randn(shape, device=device) * 2, dim=1)
    check(logits, probs, **options)


def test_matches_torch_on_shared_arguments(device):
    logits = torch.randn(16, 33, device=device, requires_grad=True)
    target = random_targets(16, 33, device, n_ignored=3)
    weight = torch.rand(33, device=device)
    for kwargs in [dict(), dict(weight=weight, label_smoothing=0.15), dict(reduction="sum", ignore_index=28)]:
        target = torch.where(target == -100, 28, target) if "ignore_index" in kwargs else target
        ours = nanfuse.cross_entropy(logits, target, **kwargs)
        (g_ours,) = torch.autograd.grad(ours, logits)
        theirs = F.cross_entropy(logits, target, **kwargs)
        (g_theirs,) = torch.autograd.grad(theirs, logits)
        assert_close(ours, theirs.double(), torch.float32, "loss vs torch")
        assert_close(g_ours, g_theirs.double(), torch.float32, "grad vs torch")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_layouts_class_dim_at_1(reduction, device):
    # (C,), (N, C, d1, d2) with probability and index targets, as in F.cross_entropy
    x1 = torch.randn(11, device=device, requires_grad=True)
    for t1 in [torch.tensor(4, device=device), torch.softmax(torch.randn(11, device=device), 0)]:
        ours, theirs = nanfuse.cross_entropy(x1, t1, reduction=reduction), F.cross_entropy(x1, t1, reduction=reduction)
        assert ours.shape == theirs.shape
        assert_close(ours, theirs.double())
    x = torch.randn(3, 7, 4, 5, device=device, requires_grad=True)
    t = torch.randint(0, 7, (3, 4, 5), device=device)
    t[0, 0, 0] = -100
    ours = nanfuse.cross_entropy(x, t, reduction=reduction)
    theirs = F.cross_entropy(x, t, reduction=reduction)
    assert ours.shape == theirs.shape
    assert_close(ours, theirs.double())
    up = torch.rand_like(ours)
    assert_close(torch.autograd.grad(ours, x, up)[0], torch.autograd.grad(theirs, x, up)[0].double())
    p = torch.softmax(torch.randn(3, 7, 4, 5, device=device), dim=1)
    assert_close(nanfuse.cross_entropy(x, p, reduction=reduction), F.cross_entropy(x, p, reduction=reduction).double())


def test_transposed_and_strided_views(device):
    # TransformerEngine #2734: a transposed view must not be read as if it were contiguous
    base = torch.randn(300, 8, device=device)
    logits = base.t()  # (8, 300), class stride 8
    target = random_targets(8, 300, device)
    check(logits, target)
    wide = torch.randn(5, 700, device=device)[:, 50:650]  # row stride 700, classes contiguous
    check(wide, random_targets(5, 600, device))


def test_strided_targets_and_weights(device):
    # a target column of a larger index tensor and every other entry of a weight vector: views, not copies
    logits = torch.randn(6, 50, device=device)
    targets = torch.randint(0, 50, (6, 3), device=device)
    weights = torch.rand(100, device=device)
    check(logits, targets[:, 1], weight=weights[::2], label_smoothing=0.1)
    check(logits, targets[:, 2], weight=weights[::2], reduction="none")


def test_int64_offsets_past_2_31_elements(device):
    # flash-attention #714, PyTorch #111484: row 1 starts 2**31 elements in; only touched pages are resident
    n_classes = 1000
    storage = torch.empty(2**31 + n_classes, dtype=torch.bfloat16, device=device)
    logits = storage.as_strided((2, n_classes), (2**31, 1))
    logits.copy_(torch.randn(2, n_classes, device=device) * 3)
    check(logits, torch.tensor([7, 993], device=device), reduction="none")


def test_leading_blocks_all_masked(device):
    # flash-attention #1930: the running max starts at -inf; whole leading 4096-blocks are -inf
    logits = torch.randn(3, 3 * 4096 + 5, device=device)
    logits[:, : 2 * 4096 + 100] = float("-inf")
    target = torch.tensor([2 * 4096 + 100, 3 * 4096, -100], device=device)
    loss, grad, _ = run(logits, target, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (grad[:, : 2 * 4096 + 100] == 0).all()  # masked classes get probability exactly 0
    check(logits, target, reduction="none")


def test_softcap_padding_lanes_leak_no_mass(device):
    # unsloth #10616: softcap of the -inf padding lanes is -softcap, not -inf; C = 1001 pads the last block
    logits = torch.randn(4, 1001, device=device) * 10
    logits[0, 500:] = float("-inf")
    check(logits, random_targets(4, 1001, device, n_ignored=0), softcap=2.0, reduction="none")


def test_bf16_target_gradient_when_p_is_near_one(device):
    # Liger #1329: p = 0.999 for the target; p - 1 must be formed in fp32, not as bf16(p) - 1
    logits = torch.zeros(4, 1000, device=device)
    logits[:, 0] = 13.81  # exp(13.81) / (exp(13.81) + 999) = 0.999
    logits = logits.to(torch.bfloat16)
    target = torch.zeros(4, dtype=torch.long, device=device)
    _, grad, upstream = run(logits, target, reduction="sum", upstream=torch.tensor(1.0, device=device))
    _, ref_grad = reference(logits, target, upstream, reduction="sum")
    assert -0.01 < ref_grad[0, 0] < -1e-4
    assert_close(grad[:, 0], ref_grad[:, 0], torch.bfloat16, "target-class grad")


def test_inplace_backward_bumps_version_counter(device):
    # Liger #272: an op that saved the logits must raise, not silently use the overwritten values
    h = torch.randn(6, 50, device=device, requires_grad=True)
    logits = h.exp()  # exp saves its output
    loss = nanfuse.cross_entropy(logits, random_targets(6, 50, device), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inplace_backward_gives_the_same_gradient(device):
    h = torch.randn(6, 20, device=device, requires_grad=True)
    w = torch.randn(20, 300, device=device)
    target = random_targets(6, 300, device)
    for reduction in ["mean", "none"]:
        grads, losses = [], []
        for inplace in [False, True]:
            loss = nanfuse.cross_entropy(h @ w, target, reduction=reduction, inplace_backward=inplace)
            losses.append(loss.detach())
            grads.append(torch.autograd.grad(loss.sum(), h)[0])
        assert_close(losses[1], losses[0].double())  # the loss is computed before the logits are overwritten
        assert_close(grads[1], grads[0].double())


def test_inplace_backward_on_a_leaf_is_refused(device):
    leaf = torch.randn(3, 10, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="inplace_backward"):
        nanfuse.cross_entropy(leaf, torch.zeros(3, dtype=torch.long, device=device), inplace_backward=True)


def test_ignored_and_empty_batches_give_zero(device):
    logits = torch.randn(4, 9, device=device, requires_grad=True)
    target = torch.full((4,), -100, device=device)
    for reduction in ["mean", "sum"]:
        loss = nanfuse.cross_entropy(logits, target, reduction=reduction, z_loss=1e-2)
        loss.backward()
        assert loss.item() == 0.0 and (logits.grad == 0).all()
        logits.grad = None
    empty = torch.randn(0, 9, device=device, requires_grad=True)
    loss = nanfuse.cross_entropy(empty, torch.zeros(0, dtype=torch.long, device=device))
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == (0, 9)
    zero_weight = torch.zeros(9, device=device)
    assert nanfuse.cross_entropy(logits, torch.zeros(4, dtype=torch.long, device=device), zero_weight).item() == 0.0


def test_nan_row_stays_in_its_row(device):
    logits = torch.randn(5, 300, device=device)
    logits[2, 17] = float("nan")
    target = random_targets(5, 300, device, n_ignored=0)
    loss, grad, upstream = run(logits, target, reduction="none")
    assert loss[2].isnan() and grad[2].isnan().all()
    keep = [0, 1, 3, 4]
    ref_loss, ref_grad = reference(logits[keep], target[keep], upstream[keep], reduction="none")
    assert_close(loss[keep], ref_loss)
    assert_close(grad[keep], ref_grad)
    assert nanfuse.cross_entropy(logits, target).isnan()  # the mean shows it too: never hidden


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("shape", [(4, 5), (2, 5, 3)], ids=["2d", "k-dim"])
def test_ignored_rows_with_non_finite_logits_get_zero_gradient(shape, value, device):
    # the README's deviation on every path, the small CPU calls that run PyTorch's own op included (there the
    # ignored row's log-softmax is NaN, and PyTorch's backward multiplies it by the row's upstream 0)
    logits = torch.randn(shape, device=device)
    target = torch.randint(0, 5, shape[:1] + shape[2:], device=device)
    ignored = (0, slice(None), 0) if len(shape) == 3 else (0, slice(None))
    target[ignored[:1] + ignored[2:]] = -100
    clean = logits.clone()
    if value == "-inf":
        logits[ignored] = float("-inf")  # a fully masked row
    else:
        logits[ignored][1] = float(value)
    x = logits.clone().requires_grad_()
    loss = nanfuse.cross_entropy(x, target)
    loss.backward()
    assert (x.grad[ignored] == 0).all()
    x_ref = clean.double().requires_grad_()
    rows = x_ref.movedim(1, -1).reshape(-1, 5)
    ref_loss = cross_entropy_ref(rows, target.reshape(-1))
    ref_loss.backward()
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(x.grad, x_ref.grad, torch.float32, "grad")


def test_out_of_range_target_is_an_error_on_cpu():
    logits = torch.randn(3, 10)
    for bad in [10, -1]:
        with pytest.raises(ValueError, match="target"):
            nanfuse.cross_entropy(logits, torch.tensor([1, bad, 2]))


def test_out_of_range_target_poisons_only_its_row(device):
    # what a CUDA kernel does where checking would cost a sync: NaN in that row, no out-of-bounds read
    logits = torch.randn(3, 10, device=device, requires_grad=True)
    target = torch.tensor([1, 10, -100], device=device)
    opts = CrossEntropyOptions(reduction="none")
    loss = CrossEntropyFunction.apply(logits, target, None, opts, True, False)[0]
    assert loss[0].isfinite() and loss[1].isnan() and loss[2] == 0
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert grad[0].isfinite().all() and grad[1].isnan().all() and (grad[2] == 0).all()


def test_stride_zero_upstream_gradient(device):
    logits = torch.randn(7, 130, device=device, requires_grad=True)
    target = random_targets(7, 130, device)
    loss = nanfuse.cross_entropy(logits, target, reduction="none")
    loss.sum().backward()  # the upstream gradient arrives as an expanded, stride-0 tensor
    ref_loss, ref_grad = reference(logits, target, torch.ones(7), reduction="none")
    assert_close(logits.grad, ref_grad)


def test_backward_twice_through_the_graph(device):
    logits = torch.randn(3, 10, device=device, requires_grad=True)
    loss = nanfuse.cross_entropy(logits, torch.tensor([1, 2, 3], device=device))
    (first,) = torch.autograd.grad(loss, logits, torch.tensor(2.0, device=device), retain_graph=True)
    if nanfuse._backend.uses_triton(logits):  # the kernel path scales its saved gradient in place
        with pytest.raises(RuntimeError, match="retain_graph"):
            torch.autograd.grad(loss, logits)
    else:
        (second,) = torch.autograd.grad(loss, logits, torch.tensor(2.0, device=device))
        assert torch.equal(first, second)


def test_module_matches_functional(device):
    weight = torch.rand(40, device=device)
    module = nanfuse.CrossEntropyLoss(weight=weight, label_smoothing=0.1, z_loss=1e-3)
    logits = torch.randn(8, 40, device=device)
    target = random_targets(8, 40, device)
    assert module.weight is weight
    assert_close(module(logits, target),
                 nanfuse.cross_entropy(logits, target, weight, label_smoothing=0.1, z_loss=1e-3).double())


def test_autocast_takes_half_logits_as_they_are():
    logits = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nanfuse.cross_entropy(logits, torch.tensor([1, 2, 3, 4]))
    loss.backward()
    assert loss.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16


def test_gradcheck_in_float64():
    logits = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 6, -100, 3])
    weight = torch.rand(7, dtype=torch.float64)
    for reduction in ["mean", "none"]:
        def loss(x, reduction=reduction):
            return nanfuse.cross_entropy(x, target, weight, reduction=reduction, label_smoothing=0.1, z_loss=0.01,
                                         softcap=3.0, logit_scale=1.3)

        assert torch.autograd.gradcheck(loss, (logits,))


@pytest.mark.parametrize("call, match", [
    (lambda x, t: nanfuse.cross_entropy(x.long(), t), "input"),
    (lambda x, t: nanfuse.cross_entropy(x, t[:2]), "target"),
    (lambda x, t: nanfuse.cross_entropy(x, t.float()), "target"),
    (lambda x, t: nanfuse.cross_entropy(x, t, reduction="avg"), "reduction"),
    (lambda x, t: nanfuse.cross_entropy(x, t, label_smoothing=1.5), "label_smoothing"),
    (lambda x, t: nanfuse.cross_entropy(x, t, label_smoothing=-0.1), "label_smoothing"),
    (lambda x, t: nanfuse.cross_entropy(x, t, softcap=0.0), "softcap"),
    (lambda x, t: nanfuse.cross_entropy(x, t, softcap=-1.0), "softcap"),
    (lambda x, t: nanfuse.cross_entropy(x, t, logit_scale=0.0), "logit_scale"),
    (lambda x, t: nanfuse.cross_entropy(x, t, z_loss=float("nan")), "z_loss"),
    (lambda x, t: nanfuse.cross_entropy(x, t, weight=torch.ones(3)), "weight"),
    (lambda x, t: nanfuse.cross_entropy(x[0, 0], t), "input"),
])
def test_bad_arguments_name_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(torch.randn(4, 10), torch.tensor([1, 2, 3, 4]))


finite_fp32 = st.floats(-2.0**100, 2.0**100, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=25, deadline=None)
@given(values=st.lists(finite_fp32, min_size=3, max_size=60), n_rows=st.integers(1, 3),
       dtype=st.sampled_from(DTYPES), smoothing=st.sampled_from([0.0, 0.1]))
def test_finite_logits_give_finite_loss_and_gradient(values, n_rows, dtype, smoothing):
    n_classes = max(1, len(values) // n_rows)
    logits = torch.tensor(values[: n_rows * n_classes]).reshape(n_rows, n_classes)
    limit = torch.finfo(dtype).max / 4
    logits = logits.clamp(-limit, limit).to(dtype).requires_grad_()
    target = torch.randint(0, n_classes, (n_rows,))
    loss = nanfuse.cross_entropy(logits, target, label_smoothing=smoothing, reduction="none")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logits.grad).all()


def test_large_logits_keep_their_precision(device):
    # lse - x formed as (max - x) + log(sum): a single fp32 lse of ~1e4 would carry an ulp of 1e-3
    logits = torch.randn(4, 3000, device=device) * 3 + 1e4
    logits[1] = torch.randn(3000) * 1e37
    check(logits, random_targets(4, 3000, device, n_ignored=0), reduction="none", label_smoothing=0.1)


@pytest.mark.skipif(nanfuse.current_backend() == "interpret",
                    reason="the interpreter's casts truncate, a bias of their own; the default pass checks this")
@pytest.mark.parametrize("through_op", [False, True], ids=["eager", "registered-op"])
def test_half_precision_gradient_is_scaled_without_bias(through_op, device):
    # the upstream factor (here 1/29, as a loss divided by its number of target tokens) must be applied in
    # fp32: rounded to bf16 first, it would scale the whole gradient by up to 2**-9 too much or too little
    logits = (torch.randn(64, 1000, device=device) * 2).to(torch.bfloat16)
    target = torch.randint(0, 1000, (64,), device=device)
    x = logits.clone().requires_grad_()
    with registered_ops(through_op):
        (nanfuse.cross_entropy(x, target, reduction="sum") / 29).backward()
    x_ref = logits.cpu().double().requires_grad_()
    (cross_entropy_ref(x_ref, target.cpu(), reduction="sum") / 29).backward()
    relative_error = (x.grad.cpu().double() - x_ref.grad) / x_ref.grad
    assert abs(relative_error.mean().item()) < 2e-4  # round-to-nearest errors average out; a bias does not
