"""nanfuse.cross_entropy at the edges: no gradient work without a gradient, in-place safety, second
derivatives, gradients of probability targets, PyTorch's argument rules, meta tensors, torch.func, and the
exact bound of the finiteness promise. Each test names the item of issue 12 it covers.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from reference import cross_entropy_ref
from torch.utils._python_dispatch import TorchDispatchMode

import nanfuse

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


class Allocations(TorchDispatchMode):
    """The shapes of every tensor an aten op creates from nothing (empty, empty_like, zeros, ...)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(name in func.__name__ for name in ("empty", "zeros", "full", "ones")) and isinstance(out, torch.Tensor):
            self.shapes.append(tuple(out.shape))
        return out


# ---------------------------------------------------------------- item 2: no gradient, no gradient work


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "detached"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_gradient_work_and_no_write_without_a_gradient(mode, reduction, dtype):
    h = torch.randn(16, 300, requires_grad=True)
    logits = (h * 2).to(dtype)  # a non-leaf that requires grad: inplace_backward is allowed on it
    before = logits.detach().clone()
    target = torch.randint(0, 300, (16,))
    context = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode(),
               "detached": torch.enable_grad()}[mode]
    x = logits.detach() if mode == "detached" else logits
    with Allocations() as trace, context:
        loss = nanfuse.cross_entropy(x, target, reduction=reduction, inplace_backward=True)
    assert torch.equal(logits.detach(), before)  # nothing written into the logits
    assert (16, 300) not in trace.shapes  # no gradient buffer
    assert loss.grad_fn is None
    assert_close(loss, cross_entropy_ref(before.double(), target, reduction=reduction), torch.float32, "loss")


# ---------------------------------------------------------------- item 3: inplace_backward and strides


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_backward_on_strided_rows(reduction, dtype):
    n_rows, n_classes = 6, 300
    leaf = torch.randn(n_rows, 2 * n_classes, requires_grad=True)
    big = (leaf * 3).to(dtype)  # (N, 2C); the logits are its left half: rows 2C apart
    big.retain_grad()
    outside = big[:, n_classes:].detach().clone()
    logits = big[:, :n_classes]
    target = torch.randint(0, n_classes, (n_rows,))
    loss = nanfuse.cross_entropy(logits, target, reduction=reduction, inplace_backward=True)
    upstream = torch.rand_like(loss) + 0.25 if reduction == "none" else torch.tensor(0.5)
    (loss * upstream).sum().backward()
    assert torch.equal(big.detach()[:, n_classes:], outside)  # memory outside the view untouched
    x_ref = (leaf.detach()[:, :n_classes] * 3).to(dtype).double().requires_grad_()
    (cross_entropy_ref(x_ref, target, reduction=reduction) * upstream.double()).sum().backward()
    assert_close(leaf.grad[:, :n_classes], (x_ref.grad * 3).double(), dtype, "grad")
    assert (leaf.grad[:, n_classes:] == 0).all()


def test_inplace_backward_refuses_probability_targets_that_require_grad():
    logits = torch.randn(3, 8, requires_grad=True) * 1
    target = torch.softmax(torch.randn(3, 8), 1).requires_grad_()
    with pytest.raises(ValueError, match="inplace_backward"):
        nanfuse.cross_entropy(logits, target, inplace_backward=True)


@pytest.mark.parametrize("view", [lambda w: w[:], lambda w: w.view(4, 6), lambda w: w[1:]])
def test_inplace_backward_refuses_a_view_of_a_leaf(view):
    leaf = torch.randn(4, 6, requires_grad=True)
    before = leaf.detach().clone()
    x = view(leaf)
    with pytest.raises(ValueError, match="inplace_backward") as info:
        nanfuse.cross_entropy(x, torch.zeros(x.shape[0], dtype=torch.long), inplace_backward=True)
    assert isinstance(info.value, RuntimeError)  # PyTorch raises RuntimeError for in-place on a view of a leaf
    assert torch.equal(leaf.detach(), before)


def test_inplace_backward_refuses_probability_targets_with_a_weight_that_requires_grad():
    logits = torch.randn(3, 8, requires_grad=True) * 1
    target = torch.softmax(torch.randn(3, 8), 1)
    weight = torch.rand(8).requires_grad_()
    with pytest.raises(ValueError, match="inplace_backward"):
        nanfuse.cross_entropy(logits, target, weight=weight, inplace_backward=True)


def test_inplace_backward_refuses_expanded_logits():
    leaf = torch.randn(1, 50, requires_grad=True)
    logits = (leaf * 1).expand(4, 50)  # stride 0 rows: one gradient row cannot hold four
    with pytest.raises(ValueError, match="inplace_backward"):
        nanfuse.cross_entropy(logits, torch.tensor([1, 2, 3, 4]), inplace_backward=True)


# ---------------------------------------------------------------- item 4: second derivatives


def gradient_penalty(ce, x, target, **kwargs):
    (g,) = torch.autograd.grad(ce(x, target, **kwargs), x, create_graph=True)
    return (g * g).sum()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_double_backward_gives_pytorchs_values(reduction, dtype):
    # a gradient penalty through the loss: the logits depend on a leaf, the penalty on the gradient
    leaf = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 8, -100, 3, 3])
    kwargs = dict(reduction=reduction, label_smoothing=0.1)

    def penalty(ce):
        x = (leaf * 2).to(dtype)
        out = ce(x, target, **kwargs)
        out = out.sum() if reduction == "none" else out
        (g,) = torch.autograd.grad(out, x, create_graph=True)
        (d,) = torch.autograd.grad((g.double() ** 2).sum(), leaf)
        return d

    def reference(x, target, **kwargs):  # the float64 oracle on the same (rounded) logits
        return cross_entropy_ref(x.double(), target, **kwargs)

    ours, expected = penalty(nanfuse.cross_entropy), penalty(reference)
    assert ours.abs().max() > 0
    assert_close(ours, expected, dtype if dtype == torch.float64 else torch.bfloat16, "d penalty / d leaf")
    if dtype == torch.float64:  # PyTorch's own value
        assert_close(ours, penalty(F.cross_entropy), torch.float64, "against F.cross_entropy")


@pytest.mark.skipif(nanfuse.current_backend() == "interpret",
                    reason="float64 takes the PyTorch path on every backend; the default pass runs this")
def test_gradgradcheck_in_float64():
    logits = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 6, -100, 3])
    weight = torch.rand(7, dtype=torch.float64)
    probs = torch.softmax(torch.randn(4, 7, dtype=torch.float64), 1).requires_grad_()
    for reduction in ["mean", "sum", "none"]:
        def loss(x, reduction=reduction):
            return nanfuse.cross_entropy(x, target, weight, reduction=reduction, label_smoothing=0.1, z_loss=0.01,
                                         softcap=3.0, logit_scale=1.3)

        assert torch.autograd.gradgradcheck(loss, (logits,))

        def soft(x, t, reduction=reduction):
            return nanfuse.cross_entropy(x, t, weight, reduction=reduction, label_smoothing=0.2)

        assert torch.autograd.gradcheck(soft, (logits, probs))
        assert torch.autograd.gradgradcheck(soft, (logits, probs))


def test_double_backward_where_logits_are_not_kept_is_a_clear_error():
    # fp32 mean/sum keep the gradient written in forward, not the logits: a silent 0 would be the alternative
    # (beyond SMALL_CPU_LOGITS: smaller plain CPU calls run PyTorch's own ops, which do support it)
    x = torch.randn(4, 20_000, requires_grad=True)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        gradient_penalty(nanfuse.cross_entropy, x * 1, torch.tensor([0, 1, 2, 3]))


# ---------------------------------------------------------------- item 5: gradients of probability targets


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("logits_grad", [True, False], ids=["both", "target-only"])
def test_probability_targets_get_their_gradient(reduction, logits_grad):
    torch.manual_seed(0)
    x = torch.randn(6, 40, requires_grad=logits_grad)
    t = torch.softmax(torch.randn(6, 40), 1).requires_grad_()
    w = (torch.rand(40) + 0.5).requires_grad_()
    kwargs = dict(reduction=reduction, label_smoothing=0.1)
    results = []
    for ce in (nanfuse.cross_entropy, F.cross_entropy):
        loss = ce(x, t, w, **kwargs)
        upstream = torch.linspace(0.5, 2, loss.numel()).reshape(loss.shape)
        inputs = [t, w] + ([x] if logits_grad else [])
        results.append(torch.autograd.grad(loss, inputs, upstream))
    for ours, theirs, what in zip(*results, ["target", "weight", "logits"]):
        assert_close(ours, theirs.double(), torch.float32, f"d/d{what}")


# ---------------------------------------------------------------- item 6: a NaN/Inf weight of an unused class


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_weight_of_an_unused_class_stays_out(bad, dtype):
    x = (torch.randn(5, 12) * 2).to(dtype).requires_grad_()
    target = torch.tensor([0, 3, 5, 5, -100])
    weight = torch.rand(12) + 0.5
    weight[7] = bad  # no target is class 7
    for reduction in ["mean", "sum", "none"]:
        loss = nanfuse.cross_entropy(x, target, weight, reduction=reduction)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        ref = F.cross_entropy(x.float(), target, weight, reduction=reduction)
        (ref_grad,) = torch.autograd.grad(ref.sum(), x)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        assert_close(loss, ref.double(), torch.float32, "loss")
        assert_close(grad, ref_grad.double(), dtype, "grad")


# ---------------------------------------------------------------- item 10: the finiteness bound

FP32_MAX = torch.finfo(torch.float32).max
FP32_OVERFLOW = 2.0**128 - 2.0**103  # the smallest value that rounds to inf in fp32: max + half an ulp


@pytest.mark.parametrize("magnitude", [1e38, 3e38, FP32_MAX])
@pytest.mark.parametrize("smoothing", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("probability", [False, True])
def test_finite_logits_give_a_finite_loss_when_every_term_fits(magnitude, smoothing, probability):
    # the README's promise: finite whenever every exact a_c * (lse - x_c), and the loss, fit in fp32.
    # lse - x_c itself is 2 * magnitude here, beyond fp32 for magnitude > fp32 max / 2
    logits = torch.tensor([[magnitude, -magnitude, 0.0]])
    target = torch.tensor([[0.8, 0.0, 0.2]]) if probability else torch.tensor([0])
    loss = nanfuse.cross_entropy(logits, target, label_smoothing=smoothing, reduction="none")
    exact = cross_entropy_ref(logits.double(), target.double() if probability else target,
                              label_smoothing=smoothing, reduction="none")
    x = logits.double()
    gap = torch.logsumexp(x, 1, keepdim=True) - x  # lse - x_c, exactly
    dense = target.double() if probability else F.one_hot(target, 3).double()
    terms = ((1 - smoothing) * dense + smoothing / 3) * gap  # a_c * (lse - x_c)
    if terms.max() < FP32_OVERFLOW and exact.max() < FP32_OVERFLOW:
        assert torch.isfinite(loss).all()
        assert_close(loss, exact, torch.float32, "loss")
    else:
        assert loss[0] == float("inf")


@pytest.mark.parametrize("n_classes", [3, 40_000], ids=["pytorch_ops", "twelve_ops"])
@pytest.mark.parametrize("options", [{}, {"weight": True}], ids=["no_option", "weight"])
def test_a_mean_whose_row_sum_overflows_stays_finite(n_classes, options):
    # the promise holds for the mean itself, on the lean CPU paths too (no option: PyTorch's ops below
    # SMALL_CPU_LOGITS, the 12-op path above): two rows of loss 3e38 sum past fp32's max, their mean does not
    logits = torch.zeros(2, n_classes)
    logits[:, 1] = -3e38
    target = torch.tensor([1, 1])
    weight = torch.ones(n_classes) if options.get("weight") else None
    x = logits.clone().requires_grad_()
    loss = nanfuse.cross_entropy(x, target, weight)
    x_ref = logits.double().requires_grad_()
    exact = cross_entropy_ref(x_ref, target, weight)
    assert torch.isfinite(loss)
    assert_close(loss, exact, torch.float32, "loss")
    loss.backward()
    exact.backward()
    assert_close(x.grad, x_ref.grad, torch.float32, "gradient")


def test_logit_scale_finiteness_bound():
    # the README's bound without softcap: finite while logit_scale * |x| fits in fp32; past it the scaled logits
    # overflow and the loss is NaN, as F.cross_entropy(x * logit_scale) gives
    at_bound = FP32_MAX / 2
    past_bound = torch.nextafter(torch.tensor(at_bound), torch.tensor(float("inf"))).item()
    for value, finite in [(at_bound, True), (past_bound, False)]:
        leaf = torch.full((1, 3), value, requires_grad=True)
        loss = nanfuse.cross_entropy(leaf * 1, torch.tensor([0]), logit_scale=2.0)
        loss.backward()
        if finite:
            assert_close(loss, torch.tensor(3.0, dtype=torch.float64).log(), torch.float32, "loss")
            assert_close(leaf.grad, torch.tensor([[-4 / 3, 2 / 3, 2 / 3]], dtype=torch.float64), torch.float32, "grad")
        else:
            assert loss.isnan() and loss.isnan() == F.cross_entropy(leaf.detach() * 2.0, torch.tensor([0])).isnan()


@pytest.mark.parametrize("magnitude", [3e38, FP32_MAX])
def test_softcap_keeps_finite_logits_finite_whatever_the_scale(magnitude):
    leaf = torch.tensor([[magnitude, -magnitude, 0.0]], requires_grad=True)
    kwargs = dict(logit_scale=2.0, softcap=30.0, reduction="none")
    loss = nanfuse.cross_entropy(leaf * 1, torch.tensor([1]), **kwargs)
    loss.sum().backward()
    x_ref = leaf.detach().double().requires_grad_()
    exact = cross_entropy_ref(x_ref, torch.tensor([1]), **kwargs)
    exact.sum().backward()
    assert_close(loss, exact, torch.float32, "loss")
    assert_close(leaf.grad, x_ref.grad, torch.float32, "grad")


# ---------------------------------------------------------------- item 12: meta tensors


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(7,), (4, 7), (2, 7, 3, 5)])
def test_meta_tensors_give_shaped_meta_results(shape, reduction):
    x = torch.empty(shape, device="meta", requires_grad=True)
    target = torch.empty(shape[:1] + shape[2:] if len(shape) > 1 else (), dtype=torch.long, device="meta")
    for t in (target, torch.empty(shape, device="meta")):
        ours = nanfuse.cross_entropy(x, t, reduction=reduction)
        theirs = F.cross_entropy(x, t, reduction=reduction)
        assert ours.device.type == "meta" and ours.shape == theirs.shape and ours.dtype == torch.float32
        (grad,) = torch.autograd.grad(ours.sum(), x)  # the meta loss backpropagates, as PyTorch's does
        assert grad.device.type == "meta" and grad.shape == x.shape


@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1, reduction="sum")], ids=["plain", "options"])
@pytest.mark.parametrize("shape", [(8, 10), (64, 2000)], ids=["small", "beyond SMALL_CPU_LOGITS"])
def test_fake_cpu_tensors_give_fake_results(shape, options):
    # FakeTensorMode (shape propagation, tracing) on CPU: the fast paths used to read the fake targets or loss on
    # the host (DataDependentOutputException)
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode():
        x = torch.randn(shape, requires_grad=True)
        loss = nanfuse.cross_entropy(x, torch.randint(0, shape[1], shape[:1]), **options)
        (grad,) = torch.autograd.grad(loss, x)
    assert isinstance(loss, FakeTensor) and loss.shape == () and loss.dtype == torch.float32
    assert isinstance(grad, FakeTensor) and grad.shape == shape


@pytest.mark.parametrize("tracer", ["fake_mode", "make_fx_real"])
@pytest.mark.parametrize("shape", [(8, 10), (64, 2000)], ids=["small", "beyond SMALL_CPU_LOGITS"])
def test_real_inputs_traced_by_fake_or_proxy_modes(shape, tracer):
    # a real CPU tensor under FakeTensorMode (allow_non_fake_inputs) or make_fx(tracing_mode="real"): its values
    # cannot be read on the host there (DataDependentOutputException), as PyTorch's own op reads none
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    x, t = torch.randn(shape), torch.randint(0, shape[1], shape[:1])
    if tracer == "fake_mode":
        with FakeTensorMode(allow_non_fake_inputs=True):
            loss = nanfuse.cross_entropy(x, t)
        assert isinstance(loss, FakeTensor) and loss.shape == ()
    else:
        graph = make_fx(lambda z, y: nanfuse.cross_entropy(z, y), tracing_mode="real")(x, t)
        assert_close(graph(x, t), cross_entropy_ref(x.double(), t), torch.float32)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_jit_trace_records_the_general_path():
    # torch.jit.trace records ops, not the CPU fast path's host-read branches: traced on plain targets, the function
    # must still give every-row-ignored 0 (PyTorch's op gives NaN, which the branch would redo)
    traced = torch.jit.trace(lambda z, y: nanfuse.cross_entropy(z, y), (torch.randn(3, 5), torch.tensor([0, 1, 2])))
    x = torch.randn(3, 5)
    assert traced(x, torch.full((3,), -100)) == 0
    target = torch.tensor([4, -100, 1])
    assert_close(traced(x, target), cross_entropy_ref(x.double(), target), torch.float32)


# ---------------------------------------------------------------- item 13: PyTorch's argument rules


def _raises_like_pytorch(call):
    x = torch.randn(3, 5, requires_grad=True)
    with pytest.raises(Exception) as theirs:
        call(F.cross_entropy, x)
    with pytest.raises(type(theirs.value)) as ours:
        call(nanfuse.cross_entropy, x)
    return ours.value


@pytest.mark.parametrize("call, names", [
    (lambda ce, x: ce(x, torch.softmax(torch.randn(3, 5), 1), ignore_index=2), "ignore_index"),
    (lambda ce, x: ce(x, torch.tensor([1, 2, 3]), ignore_index=1.5), "ignore_index"),
    (lambda ce, x: ce(x, torch.tensor([1, 2, 3]), ignore_index=True), "ignore_index"),
    (lambda ce, x: ce(x, torch.tensor([1, 2, 3]), ignore_index=2**70), "ignore_index"),
    (lambda ce, x: ce(x, torch.tensor([1, 2, 3]), weight=torch.rand(5, requires_grad=True)), "weight"),
    (lambda ce, x: ce(x.detach(), torch.tensor([1, 2, 3]), weight=torch.rand(5, requires_grad=True)), "weight"),
    # with no other option the small CPU calls run PyTorch's own op: the same rules there
    (lambda ce, x: ce(x, torch.tensor([1, 2, 3]), ignore_index=-100.0), "ignore_index"),
    (lambda ce, x: ce(x[0, 0], torch.tensor(1)), "input"),
    (lambda ce, x: ce(x, torch.tensor([1, 5, 3])), "target"),
    (lambda ce, x: ce(x[0], torch.tensor(-1)), "target"),
    (lambda ce, x: ce(x, torch.tensor([1, 2, 30]), label_smoothing=0.1), "target"),
    (lambda ce, x: ce(x.detach().long(), torch.tensor([1, 2, 3])), "input"),
    (lambda ce, x: ce(x.detach().to_sparse(), torch.tensor([1, 2, 3])), "input"),
    (lambda ce, x: ce(x, torch.tensor([True, False, True])), "target"),
], ids=["probabilities-with-ignore_index", "float-ignore_index", "bool-ignore_index", "huge-ignore_index",
        "weight-requires-grad", "weight-requires-grad-only", "float-default-ignore_index", "scalar-input",
        "target-past-C", "negative-target-1d", "target-past-C-with-option", "integer-input", "sparse-input",
        "bool-target"])
def test_argument_errors_have_pytorchs_class_and_name_the_argument(call, names):
    assert names in str(_raises_like_pytorch(call))


def test_a_1d_input_takes_a_0d_target_on_every_path():
    # PyTorch's forward takes a (1,) target for a (C,) input and its backward then fails ("size mismatch"): the
    # general path refuses it up front, naming target, and so must the small CPU calls that run PyTorch's op
    x = torch.randn(5, requires_grad=True)
    for kwargs in [dict(), dict(label_smoothing=0.1)]:
        with pytest.raises(ValueError, match="target") as error:
            nanfuse.cross_entropy(x, torch.tensor([2]), **kwargs)
        assert isinstance(error.value, RuntimeError)


def test_argument_rules_pytorch_accepts_are_accepted():
    x = torch.randn(3, 5)
    t = torch.tensor([1, 2, 3])
    for kwargs in [dict(ignore_index=torch.tensor(2)), dict(ignore_index=-100)]:
        assert_close(nanfuse.cross_entropy(x, t, **kwargs), F.cross_entropy(x, t, **kwargs).double())
    with torch.no_grad():  # a weight that requires grad is fine where nothing is recorded
        w = torch.rand(5, requires_grad=True)
        assert_close(nanfuse.cross_entropy(x, t, w), F.cross_entropy(x, t, w).double())


# ---------------------------------------------------------------- item 15: torch.func


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_func_vmap_and_per_sample_gradients(reduction):
    from torch.func import grad, vjp, vmap

    x = torch.randn(5, 4, 7)
    t = torch.randint(0, 7, (5, 4))
    t[0, 0] = -100
    kwargs = dict(reduction=reduction, label_smoothing=0.1)
    ours = vmap(lambda xx, tt: nanfuse.cross_entropy(xx, tt, **kwargs))(x, t)
    theirs = vmap(lambda xx, tt: F.cross_entropy(xx, tt, **kwargs))(x, t)
    assert_close(ours, theirs.double())
    per_sample = [vmap(grad(lambda xx, tt: ce(xx, tt, **kwargs).sum()))(x, t)
                  for ce in (nanfuse.cross_entropy, F.cross_entropy)]
    assert_close(per_sample[0], per_sample[1].double())
    shared_target = grad(lambda xx: nanfuse.cross_entropy(xx, t[1], **kwargs).sum())(x[1])
    assert_close(shared_target, per_sample[1][1].double())
    ours_vjp = vjp(lambda xx: nanfuse.cross_entropy(xx, t[2], **kwargs), x[2])[1](torch.tensor(0.5).expand(
        ours[2].shape))[0]
    assert_close(ours_vjp, per_sample[1][2].double() * 0.5)


@pytest.mark.parametrize("transform", ["grad", "vjp", "jacrev", "vmap_grad", "grad_of_grad"])
@pytest.mark.parametrize("shape", [(3, 7), (7,), (64, 1100)], ids=["small", "1-d", "beyond SMALL_CPU_LOGITS"])
def test_torch_func_of_the_call_with_no_option(shape, transform):
    # fp32, class indices, mean, no option: the call the CPU fast paths take outside torch.func (their forward kept
    # no normalisers, which backward under a transform reads)
    from torch.func import grad, jacrev, vjp, vmap

    x = torch.randn(shape)
    t = torch.randint(0, shape[-1], shape[:-1])
    if transform == "vmap_grad":
        x, t = x.unsqueeze(0).expand(2, *shape), t.unsqueeze(0).expand(2, *t.shape)

    def apply(ce, z):
        loss_of = lambda zz: ce(zz, t)  # noqa: E731
        return {"grad": lambda: grad(loss_of)(z),
                "vjp": lambda: vjp(loss_of, z)[1](torch.tensor(0.5, dtype=z.dtype))[0],
                "jacrev": lambda: jacrev(loss_of)(z),
                "vmap_grad": lambda: vmap(grad(lambda zz, tt: ce(zz, tt)))(z, t),
                "grad_of_grad": lambda: grad(lambda zz: grad(loss_of)(zz).pow(2).sum())(z)}[transform]()

    assert_close(apply(nanfuse.cross_entropy, x), apply(F.cross_entropy, x.double()), torch.float32, transform)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("case", ["mean", "none_sum", "probabilities"])
def test_torch_func_jacrev_of_jacrev_gives_pytorchs_hessian(case, dtype):
    from torch.func import jacrev

    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64)
    target = torch.softmax(torch.randn(3, 5, dtype=torch.float64), 1) if case == "probabilities" else torch.tensor(
        [0, 4, 2])
    reduction = "none" if case == "none_sum" else "mean"

    def hessian_of(ce, z, t):
        return jacrev(jacrev(lambda zz: ce(zz, t, reduction=reduction, label_smoothing=0.1).sum()))(z)

    ours = hessian_of(nanfuse.cross_entropy, x.to(dtype), target.to(dtype) if case == "probabilities" else target)
    theirs = hessian_of(F.cross_entropy, x, target)
    assert theirs.abs().max() > 0.01
    assert_close(ours, theirs, dtype, "hessian")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_batched_upstream_gradients_through_backward(reduction, dtype):
    # vmap over the backward: a vjp's function under vmap, is_grads_batched=True, jacobian(vectorize=True)
    from torch.func import vjp, vmap

    torch.manual_seed(0)
    x, t = torch.randn(3, 5).to(dtype), torch.tensor([0, 4, 2])
    upstream = torch.randn(4, *(() if reduction == "mean" else (3,)))
    results = []
    for ce in (nanfuse.cross_entropy, F.cross_entropy):
        z = x.double() if ce is F.cross_entropy else x

        def loss_of(zz):
            return ce(zz, t, reduction=reduction, label_smoothing=0.1)

        pullback = vjp(loss_of, z)[1]
        leaf = z.clone().requires_grad_()
        loss = loss_of(leaf * 1)
        results.append((vmap(pullback)(upstream.to(loss.dtype))[0],
                        torch.autograd.grad(loss, leaf, upstream.to(loss.dtype), is_grads_batched=True)[0],
                        torch.autograd.functional.jacobian(loss_of, z, vectorize=True)))
    for ours, theirs in zip(*results):
        assert_close(ours, theirs, dtype)


def test_torch_func_refuses_inplace_backward_by_name():
    from torch.func import grad, vjp

    x, t = torch.randn(4, 7), torch.tensor([0, 1, 2, 3])
    for transform in (lambda f: grad(f)(x), lambda f: vjp(f, x)[1](torch.tensor(1.0))):
        with pytest.raises(ValueError, match="inplace_backward.*torch.func"):
            transform(lambda xx: nanfuse.cross_entropy(xx * 1, t, inplace_backward=True))


def test_torch_func_jvp_is_a_documented_limit():
    from torch.func import jvp

    x = torch.randn(4, 7)
    with pytest.raises(NotImplementedError, match="jvp"):
        jvp(lambda xx: nanfuse.cross_entropy(xx, torch.tensor([0, 1, 2, 3])), (x,), (torch.ones_like(x),))


# ---------------------------------------------------------------- the registered op (what torch.compile runs)


def test_registered_op_gives_target_gradients_and_refuses_double_backward():
    from nanfuse._backend import registered_ops

    x = torch.randn(4, 9, requires_grad=True)
    t = torch.softmax(torch.randn(4, 9), 1).requires_grad_()
    with registered_ops():
        for reduction in ["mean", "none"]:
            ours = torch.autograd.grad(nanfuse.cross_entropy(x, t, reduction=reduction).sum(), [x, t])
            theirs = torch.autograd.grad(F.cross_entropy(x, t, reduction=reduction).sum(), [x, t])
            for a, b in zip(ours, theirs):
                assert_close(a, b.double(), torch.float32)
        y = x.double()
        (g,) = torch.autograd.grad(nanfuse.cross_entropy(y, torch.tensor([1, 2, 3, 4])), y, create_graph=True)
        with pytest.raises(RuntimeError, match="no autograd formula"):
            g.sum().backward()


def test_backward_ops_pass_opcheck():
    from nanfuse import _ops

    logits = torch.randn(5, 23)
    probs = torch.softmax(torch.randn(5, 23), 1)
    weight = torch.rand(23) + 0.5
    _, grad, _, scalars = _ops._cross_entropy(logits.requires_grad_(), probs, weight, -100, "mean", 0.1, 0.0, None,
                                              1.0, 1.0, None, True)
    torch.library.opcheck(_ops._cross_entropy_scale_grad, (grad, torch.tensor(0.5)))
    torch.library.opcheck(_ops._cross_entropy_target_grads,
                          (logits.detach(), probs, weight, scalars, torch.tensor(0.5), 0.1, None, 1.0, True, True))
