"""Property test of nanfuse.cross_entropy: shapes (C from 1 to past one 4096-wide block, N from 0), every
dtype, every option and their combinations, the upstream factors training loops apply, magnitudes up to a
quarter of the dtype's largest value, rows with NaN, -inf classes and ignored rows. Each draw is checked
against the float64 oracle and, where this run uses the Triton kernels (NANFUSE_BACKEND=interpret), against
the pure-PyTorch path too.
"""

import torch
from helpers import TOLERANCES, assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import cross_entropy_ref

import nanfuse

UPSTREAM = [1.0, 0.5, 1 / 29, 65536.0]  # none, a half, 1/num_items, a GradScaler's loss scale


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
    n_rows = draw(st.integers(0, 5))
    n_classes = draw(st.sampled_from([1, 2, 3, 17, 1000, 4097]))
    huge = draw(st.booleans())
    magnitude = torch.finfo(dtype).max / 4 if huge else draw(st.sampled_from([1.0, 8.0, 1e4]))
    probabilities = draw(st.booleans())
    opts = dict(
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1])),
        softcap=draw(st.sampled_from([None, 5.0])),
        # a scale > 1 or a z-loss (lse**2) would push the largest magnitudes past fp32 in the exact result
        logit_scale=draw(st.sampled_from([1.0, 0.5] if huge else [1.0, 0.5, 2.0])),
        z_loss=0.0 if huge else draw(st.sampled_from([0.0, 1e-3])),
        inplace_backward=draw(st.booleans()),
    )
    if not probabilities:
        opts["ignore_index"] = draw(st.sampled_from([-100, 0]))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_rows, n_classes, generator=generator).double() * magnitude
    logits = logits.clamp(-magnitude, magnitude).to(dtype)
    if draw(st.booleans()):
        opts["weight"] = (torch.rand(n_classes, generator=generator) + 0.1).to(dtype)
    if probabilities:
        target = torch.softmax(torch.randn(n_rows, n_classes, generator=generator) * 2, 1).to(dtype)
    else:
        target = torch.randint(0, n_classes, (n_rows,), generator=generator)
        if n_rows > 1:
            target[0] = opts["ignore_index"]  # an ignored row
    special = draw(st.sampled_from(["none", "nan", "-inf"]))
    if n_rows > 1 and n_classes > 1 and special == "nan":
        logits[-1, n_classes // 2] = float("nan")
    elif n_rows > 1 and n_classes > 2 and special == "-inf" and not probabilities and not opts["label_smoothing"]:
        masked = torch.arange(n_classes) % 3 == 1  # masked classes that no target uses
        target = torch.where(masked[target.clamp(min=0)] & (target >= 0), 0, target)
        logits[1:, masked] = float("-inf")
    if opts["reduction"] == "none":
        upstream = torch.rand(n_rows, generator=generator).double() * 2 + 0.25  # a per-row tensor
    else:
        upstream = torch.tensor(draw(st.sampled_from(UPSTREAM)), dtype=torch.float64)
    return logits, target, opts, upstream


def loss_and_grad(logits, target, opts, upstream):
    leaf = logits.clone().requires_grad_()
    x = leaf * 1 if opts["inplace_backward"] else leaf  # in place needs a non-leaf
    loss = nanfuse.cross_entropy(x, target, **opts)
    loss.backward(upstream.to(loss.dtype))
    return loss.detach(), leaf.grad


def reference(logits, target, opts, upstream):
    x = logits.detach().double().requires_grad_()  # detach: .double() of fp64 logits is the tensor itself
    kwargs = {k: v.double() if torch.is_tensor(v) else v for k, v in opts.items() if k != "inplace_backward"}
    loss = cross_entropy_ref(x, target.double() if target.is_floating_point() else target, **kwargs)
    loss.backward(upstream)
    return loss.detach(), x.grad


@settings(max_examples=60, deadline=None, derandomize=True)  # the same draws on every run: no flaky CI
@given(problem=problems())
def test_cross_entropy_matches_the_oracle_and_the_other_path(problem):
    logits, target, opts, upstream = problem
    dtype = logits.dtype
    loss, grad = loss_and_grad(logits, target, opts, upstream)
    ref_loss, ref_grad = reference(logits, target, opts, upstream)
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == loss_dtype and grad.dtype == dtype
    # the exact loss rounded to the loss dtype: inf where it is past fp32's range (the README's bound)
    assert_close(loss, ref_loss.to(loss_dtype).double(), loss_dtype, "loss")
    if not target.is_floating_point():  # a documented deviation: ignored rows get exactly 0, NaN logits or not
        ignored = target == opts["ignore_index"]
        assert (grad[ignored] == 0).all()
        ref_grad[ignored] = 0.0
    # the gradient is rounded once to the logits' dtype (fp16 may overflow to inf there, as PyTorch's would);
    # the absolute tolerance scales with the upstream factor, plus the dtype's smallest subnormal
    rtol, atol = TOLERANCES[dtype]
    factor = upstream.abs().max().item() if upstream.numel() else 1.0
    atol = atol * factor + torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    assert (grad.isnan() == ref_grad.isnan()).all(), "grad: NaN at different places"
    torch.testing.assert_close(grad.double(), ref_grad.to(dtype).double(), rtol=rtol, atol=atol, equal_nan=True)
    if nanfuse.current_backend() == "interpret":
        with nanfuse.use_backend("torch"):
            torch_loss, torch_grad = loss_and_grad(logits, target, opts, upstream)
        assert_close(loss, torch_loss.double(), loss_dtype, "loss: Triton vs PyTorch path")
        assert_close(grad, torch_grad.double(), dtype, "grad: Triton vs PyTorch path")


@st.composite
def plain_calls(draw):
    """fp32 logits against int64 class indices with no option (the lean CPU path): 1-D, 2-D or K-dim, zero-length
    dims, some or all rows ignored, a NaN / inf / fully -inf row (ignored or not), transposed logits."""
    n_classes = draw(st.sampled_from([1, 2, 3, 17]))
    n_dims = draw(st.integers(1, 3))
    shape = (n_classes,) if n_dims == 1 else (draw(st.integers(0, 4)), n_classes) + tuple(
        draw(st.integers(0, 3)) for _ in range(n_dims - 2))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = torch.randn(shape, generator=generator) * draw(st.sampled_from([1.0, 1e4, 1e38]))
    target = torch.randint(0, n_classes, shape[:1] + shape[2:] if n_dims > 1 else (), generator=generator)
    ignored = torch.rand(target.shape, generator=generator) < draw(st.sampled_from([0.0, 0.4, 1.0]))
    target = torch.where(ignored, -100, target)
    rows = logits.movedim(1, -1).reshape(-1, n_classes) if n_dims > 1 else logits.reshape(1, n_classes)
    special = draw(st.sampled_from(["none", "nan", "inf", "-inf", "masked"]))
    if rows.shape[0] and special != "none":
        row = draw(st.integers(0, rows.shape[0] - 1))
        if special == "masked":
            rows[row] = float("-inf")
        else:
            rows[row, draw(st.integers(0, n_classes - 1))] = float(special)
        logits = rows.reshape(logits.movedim(1, -1).shape).movedim(-1, 1) if n_dims > 1 else rows.reshape(shape)
    if n_dims > 1 and draw(st.booleans()):
        logits = logits.transpose(0, 1).contiguous().transpose(0, 1)  # strided classes
    return logits, target


@settings(max_examples=60, deadline=None, derandomize=True)
@given(call=plain_calls())
def test_the_plain_call_matches_the_general_path(call):
    # the lean CPU path (PyTorch's own op up to 65,536 logits) against the same call forced onto nanfuse's
    # general path (normalize_by=1.0 changes nothing else): loss, gradient, NaN places and the deviations
    logits, target = call
    results = []
    for kwargs in [{}, {"normalize_by": 1.0}]:
        x = logits.clone().requires_grad_()
        loss = nanfuse.cross_entropy(x, target, **kwargs)
        loss.backward()
        results.append((loss.detach(), x.grad))
    (loss, grad), (general_loss, general_grad) = results
    assert loss.dtype == general_loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, general_loss, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(grad, general_grad, rtol=1e-5, atol=1e-6, equal_nan=True)
    ignored = (target == -100).unsqueeze(1 if logits.dim() > 1 else 0).expand_as(logits)
    assert (grad[ignored] == 0).all()  # the README's deviation: NaN logits or not
    if (target == -100).all():
        assert loss == 0
