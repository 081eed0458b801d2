"""nanfuse.softmax / log_softmax against the float64 oracle, including fully masked rows."""

import pytest
import torch
from helpers import TOLERANCES, assert_close
from reference import softmax_ref

import nanfuse
from nanfuse._backend import registered_ops


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, dim", [((5, 1), -1), ((7, 1001), -1), ((3, 4097), 1), ((4, 6, 33), 1), ((2, 300), 0)])
def test_matches_reference(shape, dim, dtype, log, device):
    op = nanfuse.log_softmax if log else nanfuse.softmax
    x = (torch.randn(shape, device=device) * 3).to(dtype).requires_grad_()
    y = op(x, dim=dim)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    x_ref = x.detach().cpu().double().requires_grad_()
    y_ref = softmax_ref(x_ref, dim=dim, log=log)
    y_ref.backward(upstream.cpu().double())
    assert y.dtype == dtype and x.grad.dtype == dtype
    assert_close(y, y_ref, dtype, "output")
    if dtype == torch.float32:
        assert_close(x.grad, x_ref.grad, dtype, "grad")
    else:
        # backward starts from the saved output, already rounded to half precision, and (dy - sum dy*y)
        # cancels: allow twice PyTorch's own error in this dtype, on the same inputs
        x_torch = x.detach().clone().requires_grad_()
        (torch.log_softmax if log else torch.softmax)(x_torch, dim=dim).backward(upstream)
        torch_error = (x_torch.grad.double().cpu() - x_ref.grad).abs().max()
        our_error = (x.grad.double().cpu() - x_ref.grad).abs().max()
        assert our_error <= 2 * torch_error + 1e-4, f"grad error {our_error:.3g} vs PyTorch's {torch_error:.3g}"


def test_fully_masked_rows_give_zeros_not_nan(device):
    # the denominator-is-zero case: an attention row with every key masked; the first 4096-block too
    x = torch.randn(3, 5000, device=device)
    x[0] = float("-inf")
    x[1, :4200] = float("-inf")
    x.requires_grad_()
    y = nanfuse.softmax(x)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    assert (y[0] == 0).all() and (x.grad[0] == 0).all()
    assert (y[1, :4200] == 0).all() and torch.isfinite(x.grad).all()
    assert_close(y[1:], softmax_ref(x[1:].detach()))
    z = torch.randn(2, 10, device=device)
    z[0] = float("-inf")
    z.requires_grad_()
    logp = nanfuse.log_softmax(z)
    (grad,) = torch.autograd.grad(logp, z, upstream[:2, :10])
    assert (logp[0] == float("-inf")).all() and torch.isfinite(logp[1]).all()
    assert_close(grad[0], upstream[0, :10].double())  # exp(-inf) = 0: the upstream gradient passes through


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradient_on_peaked_rows_within_twice_pytorchs_error(dtype, log, device):
    # a peaked row saves y close to 1: a cast that truncates instead of rounding (the Triton interpreter's
    # fp32->bf16) costs up to an ulp there, 40-3000x PyTorch's gradient error
    x = torch.cat([torch.tensor([[10.0, 0.0, 0.0] + [-5.0] * 5]), torch.randn(6, 8) * 8]).to(device, dtype)
    upstream = torch.cat([torch.tensor([[2.0] + [0.0] * 7]), torch.randn(6, 8)]).to(device, dtype)
    x_ref = x.detach().cpu().double().requires_grad_()
    (grad_ref,) = torch.autograd.grad(softmax_ref(x_ref, 1, log), x_ref, upstream.cpu().double())
    for row in range(x.shape[0]):
        xs = x[row:row + 1].clone().requires_grad_()
        (grad,) = torch.autograd.grad(_op(log)(xs, dim=1), xs, upstream[row:row + 1])
        (grad_torch,) = torch.autograd.grad(_torch_op(log)(xs, 1), xs, upstream[row:row + 1])
        ours, theirs = _grad_error(grad.cpu(), grad_ref[row]), _grad_error(grad_torch.cpu(), grad_ref[row])
        assert ours <= 2 * theirs + 1e-6, f"row {row}: grad error {ours:.3g} vs PyTorch's {theirs:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_subnormal_outputs_are_right(dtype, device):
    # outputs below fp32's smallest normal (bf16 shares fp32's exponent range): Triton 3.9's interpreter
    # converts these to wrong values unless the kernel rounds by bits
    x = torch.tensor([[0.0, -88.0, -90.0, -95.0, -100.0]], device=device, dtype=dtype, requires_grad=True)
    y = nanfuse.softmax(x)
    expected = softmax_ref(x.detach().double())
    assert torch.equal(y.cpu(), expected.to(dtype)), (y.tolist(), expected.tolist())
    upstream = torch.tensor([[1.0, 3.0, 3.0, 3.0, 3.0]], device=device, dtype=dtype)
    (grad,) = torch.autograd.grad(y, x, upstream)
    x_torch = x.detach().requires_grad_()
    (grad_torch,) = torch.autograd.grad(torch.softmax(x_torch, 1), x_torch, upstream)
    assert torch.equal(grad, grad_torch), (grad.tolist(), grad_torch.tolist())


def test_large_logits_do_not_overflow(device):
    x = torch.tensor([[3e38, 2e38, 1e38], [1e4, 1e4 - 1, 0.0]], device=device)
    assert_close(nanfuse.softmax(x), softmax_ref(x))
    assert_close(nanfuse.log_softmax(x), softmax_ref(x, log=True))


def test_integer_input_is_refused():
    with pytest.raises(TypeError, match="input"):
        nanfuse.softmax(torch.arange(4))


def _grad_error(grad, grad_ref):
    return (grad.double() - grad_ref).abs().max()


def _torch_op(log):
    return torch.log_softmax if log else torch.softmax


def _op(log):
    return nanfuse.log_softmax if log else nanfuse.softmax


@pytest.mark.parametrize("through_op", [False, True], ids=["eager", "registered_op"])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_double_backward_matches_pytorch(dtype, log, through_op):
    # a gradient penalty: the second derivative must be PyTorch's, never a silent 0 (issue 12 item 4)
    x = torch.randn(4, 7, dtype=dtype, requires_grad=True)
    weights = torch.randn(4, 7, dtype=dtype)
    with registered_ops(through_op):
        (grad,) = torch.autograd.grad((_op(log)(x, dim=1) * weights).sum(), x, create_graph=True)
        (hess,) = torch.autograd.grad((grad**2).sum(), x)
    x_torch = x.detach().requires_grad_()
    (grad_torch,) = torch.autograd.grad((_torch_op(log)(x_torch, 1) * weights).sum(), x_torch, create_graph=True)
    (hess_torch,) = torch.autograd.grad((grad_torch**2).sum(), x_torch)
    assert hess.abs().max() > 1e-3
    torch.testing.assert_close(hess, hess_torch)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradgradcheck(dtype, log):
    x = torch.randn(2, 4, dtype=dtype, requires_grad=True)
    # fp32 finite differences: a larger step and tolerance, still far below the O(1) error of a wrong formula
    tolerance = {} if dtype == torch.float64 else dict(eps=1e-2, atol=2e-2, rtol=2e-2)
    assert torch.autograd.gradgradcheck(lambda t: _op(log)(t, dim=0), (x,), **tolerance)


@pytest.mark.parametrize("shape, dim", [((2, 3), 2), ((2, 3), -3), ((4,), 1), ((), 1), ((), -2)])
def test_dim_out_of_range_raises_index_error(shape, dim):
    x = torch.randn(shape)
    with pytest.raises(IndexError):
        torch.softmax(x, dim)
    for log in (False, True):
        with pytest.raises(IndexError, match="dim"):
            _op(log)(x, dim=dim)
    with pytest.raises(TypeError, match="dim"):
        nanfuse.softmax(x, dim=None)


@pytest.mark.parametrize("dim", [0, -1])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_zero_dim_input_follows_dim_rules(log, dim):
    x = torch.tensor(2.5, requires_grad=True)
    y = _op(log)(x, dim=dim)
    assert y.shape == () and y.item() == _torch_op(log)(x.detach(), dim).item()


@pytest.mark.parametrize("shape, dim", [((5, 0), -1), ((5, 0), 0), ((0, 3), 1), ((5, 0, 0), -1), ((2, 0, 3), 0),
                                        ((2, 0, 3), 2), ((0,), 0)])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_zero_length_dims_give_empty_results(shape, dim, log):
    x = torch.randn(shape, requires_grad=True)
    y = _op(log)(x, dim=dim)
    assert y.shape == x.shape and y.is_contiguous()
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("shape, dim", [((3, 0), 0), ((3, 2, 0), 1), ((0, 4), 0), ((3, 0, 2), 0)])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_vmap_over_zero_length_dims(shape, dim, log):
    x = torch.randn(shape)
    y = torch.func.vmap(lambda t: _op(log)(t, dim))(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, torch.func.vmap(lambda t: _torch_op(log)(t, dim))(x))


@pytest.mark.parametrize("through_op", [False, True], ids=["eager", "registered_op"])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_meta_tensors_give_meta_results(log, through_op):
    x = torch.empty(4, 6, 3, device="meta", requires_grad=True)
    with registered_ops(through_op):
        y = _op(log)(x, dim=1)
        z = _op(log)(x, dim=-1, dtype=torch.float64)
    assert y.device.type == "meta" and y.shape == x.shape and y.is_contiguous() and y.requires_grad
    assert z.device.type == "meta" and z.dtype == torch.float64
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert grad.device.type == "meta" and grad.shape == x.shape


@pytest.mark.parametrize("through_op", [False, True], ids=["eager", "registered_op"])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_fake_tensors_give_fake_results(log, through_op):
    # FakeTensorMode (tracing, shape propagation): nothing to compute, and the interpreter cannot run on them
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode(), registered_ops(through_op):
        x = torch.randn(4, 6, 3, requires_grad=True)
        y = _op(log)(x, dim=1)
        (grad,) = torch.autograd.grad(y.sum(), x)
    assert isinstance(y, FakeTensor) and y.shape == x.shape and y.is_contiguous()
    assert isinstance(grad, FakeTensor) and grad.shape == x.shape


@pytest.mark.parametrize("tracer", ["fake_mode", "make_fx_real"])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_real_inputs_traced_by_fake_or_proxy_modes(log, tracer):
    # a real CPU tensor under FakeTensorMode (allow_non_fake_inputs) or make_fx(tracing_mode="real"): the values
    # cannot be read on the host there (the CPU fast path's NaN check did), as PyTorch's own op reads none
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    x = torch.randn(4, 6)
    if tracer == "fake_mode":
        with FakeTensorMode(allow_non_fake_inputs=True):
            y = _op(log)(x, dim=1)
        assert isinstance(y, FakeTensor) and y.shape == x.shape
    else:
        graph = make_fx(lambda z: _op(log)(z, dim=1), tracing_mode="real")(x)
        assert_close(graph(x), softmax_ref(x, 1, log), torch.float32)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_jit_trace_keeps_the_masked_row_limits(log):
    # torch.jit.trace records ops, not the CPU fast path's host-read branch: traced on plain scores, the function
    # must still give a fully masked row 0 (log: -inf), not the NaN of PyTorch's op that the branch would redo
    traced = torch.jit.trace(lambda z: _op(log)(z, dim=1), (torch.randn(3, 6),))
    x = torch.randn(3, 6)
    x[0] = float("-inf")
    y = traced(x)
    assert (y[0] == (float("-inf") if log else 0.0)).all()
    assert_close(y[1:], softmax_ref(x[1:], 1, log), torch.float32)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("in_dtype, out_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float64),
                                                 (torch.float32, torch.bfloat16), (torch.float64, torch.float32)])
def test_dtype_keyword_matches_pytorch(in_dtype, out_dtype, log):
    x = (torch.randn(3, 9) * 4).to(in_dtype).requires_grad_()
    y = _op(log)(x, dim=0, dtype=out_dtype)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    x_torch = x.detach().requires_grad_()
    y_torch = _torch_op(log)(x_torch, 0, dtype=out_dtype)
    y_torch.backward(upstream)
    assert y.dtype == out_dtype and x.grad.dtype == in_dtype
    assert_close(y, y_torch, out_dtype, "output")
    x_ref = x.detach().double().requires_grad_()
    softmax_ref(x_ref, 0, log).backward(upstream.double())
    if out_dtype in (torch.float32, torch.float64) and in_dtype != torch.float16:
        assert_close(x.grad, x_ref.grad, max(in_dtype, out_dtype, key=lambda d: TOLERANCES[d][0]), "grad")
    else:  # the gradient went through half precision: as test_matches_reference, against PyTorch's own error,
        # or a few roundings of the largest gradient entry
        half = out_dtype if out_dtype in (torch.float16, torch.bfloat16) else in_dtype
        rounding = 4 * torch.finfo(half).eps * x_ref.grad.abs().max()
        torch_error = _grad_error(x_torch.grad, x_ref.grad)
        assert _grad_error(x.grad, x_ref.grad) <= max(2 * torch_error, rounding) + 1e-4
    with pytest.raises(NotImplementedError, match="dtype"):  # PyTorch raises NotImplementedError here too
        _op(log)(x, dim=0, dtype=torch.int64)


def test_integer_input_raises_pytorchs_class_too():
    with pytest.raises(NotImplementedError):
        torch.softmax(torch.arange(4), 0)
    with pytest.raises(NotImplementedError, match="input"):
        nanfuse.softmax(torch.arange(4))
    assert_close(nanfuse.softmax(torch.arange(4), 0, dtype=torch.float32), softmax_ref(torch.arange(4.0)))


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dim", [0, 1, 2, -1])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_output_is_contiguous_like_pytorch(dim, layout, log):
    x = torch.randn(3, 4, 5)
    x = {"contiguous": x, "transposed": x.transpose(0, 2), "sliced": x[:, 1:, ::2]}[layout]
    y = _op(log)(x, dim=dim)
    assert y.is_contiguous() and y.stride() == _torch_op(log)(x, dim).stride()
    assert_close(y.view(-1), softmax_ref(x, dim, log).reshape(-1))


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_torch_func_grad_vmap_jvp(log):
    x = torch.randn(4, 3, 6)
    ours, theirs = (lambda t: _op(log)(t, dim=-1)), (lambda t: _torch_op(log)(t, -1))
    torch.testing.assert_close(torch.func.vmap(ours)(x), theirs(x))
    torch.testing.assert_close(torch.func.vmap(ours, in_dims=2)(x), torch.func.vmap(theirs, in_dims=2)(x))
    # per-sample gradients: vmap over grad
    weights = torch.randn(3, 6)

    def per_sample_loss(f):
        return lambda t: (f(t) * weights).sum()

    torch.testing.assert_close(torch.func.vmap(torch.func.grad(per_sample_loss(ours)))(x),
                               torch.func.vmap(torch.func.grad(per_sample_loss(theirs)))(x))
    tangent = torch.randn_like(x)
    out, jvp_out = torch.func.jvp(ours, (x,), (tangent,))
    out_ref, jvp_ref = torch.func.jvp(theirs, (x,), (tangent,))
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(jvp_out, jvp_ref)
    cotangent = torch.randn_like(x)
    torch.testing.assert_close(torch.func.vjp(ours, x)[1](cotangent), torch.func.vjp(theirs, x)[1](cotangent))
    row = x[0, 0]
    torch.testing.assert_close(torch.func.jacrev(ours)(row), torch.func.jacrev(theirs)(row))
    torch.testing.assert_close(torch.func.jacfwd(ours)(row), torch.func.jacfwd(theirs)(row))
    torch.testing.assert_close(torch.func.hessian(lambda t: ours(t)[1])(row),
                               torch.func.hessian(lambda t: theirs(t)[1])(row))


def test_backward_takes_the_path_its_forward_took(monkeypatch):
    # on CUDA autograd runs backward on its own thread, outside the caller's use_backend block
    from nanfuse.fallback import softmax as fallback

    calls, original = [], fallback.softmax_backward
    monkeypatch.setattr(fallback, "softmax_backward", lambda *args: calls.append(1) or original(*args))
    x = torch.randn(3, 5, dtype=torch.bfloat16, requires_grad=True)  # fp32 on the host is PyTorch's own op
    with nanfuse.use_backend("torch"):
        y = nanfuse.softmax(x)
    y.backward(torch.randn_like(y))
    assert calls == [1]


@pytest.mark.parametrize("through_op", [False, True], ids=["eager", "registered_op"])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_batched_gradients_match_pytorch(log, through_op):
    # autograd's own vmap over upstream gradients: the backward gets a batch, which the kernels cannot take
    x = torch.randn(2, 3, requires_grad=True)
    eye = torch.eye(6).reshape(6, 2, 3)
    with registered_ops(through_op):
        (jac,) = torch.autograd.grad(_op(log)(x, 1), x, eye, is_grads_batched=True)
        jac_vectorized = torch.autograd.functional.jacobian(lambda t: _op(log)(t, 1), x.detach(), vectorize=True)
        assert torch.autograd.gradcheck(lambda t: _op(log)(t, 1), (x.detach().double().requires_grad_(),),
                                        check_batched_grad=True)
    (jac_torch,) = torch.autograd.grad(_torch_op(log)(x, 1), x, eye, is_grads_batched=True)
    torch.testing.assert_close(jac, jac_torch)
    torch.testing.assert_close(jac_vectorized, jac_torch.reshape(2, 3, 2, 3))


@pytest.mark.parametrize("through", ["eager", "registered_op", "compiled"])
def test_backward_keeps_forwards_choice_when_the_backend_changes(through, monkeypatch):
    # forward in a use_backend("torch") block, backward where the backend would pick the kernels: backward
    # must not ask again (the registered op, which torch.compile calls, used to)
    import sys

    from nanfuse import _backend

    module = sys.modules["nanfuse._softmax_impl"]
    chosen, original = [], module.implementation
    monkeypatch.setattr(module, "implementation", lambda use_triton: chosen.append(use_triton) or original(False))
    def f(t):
        return nanfuse.softmax(t * 2, -1)

    if through == "compiled":
        torch._dynamo.reset()
        f = torch.compile(f, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 5, dtype=torch.bfloat16, requires_grad=True)  # fp32 on the host is PyTorch's own op
    with registered_ops(through == "registered_op"), nanfuse.use_backend("torch"):
        y = f(x)
    monkeypatch.setattr(_backend, "uses_triton", lambda tensor: True)
    y.backward(torch.randn_like(y))
    assert chosen == [False, False]


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_unsupported_inputs_raise_pytorchs_class(log):
    x = torch.randn(2, 3)
    cases = {"input": [x.to(torch.float8_e4m3fn), x.to_sparse()], "dtype": [torch.float8_e5m2, torch.int32]}
    for bad_input in cases["input"]:
        with pytest.raises(NotImplementedError):
            _torch_op(log)(bad_input, 1)
        with pytest.raises(NotImplementedError, match="input"):
            _op(log)(bad_input, 1)
    for bad_dtype in cases["dtype"]:
        with pytest.raises((NotImplementedError, RuntimeError)):
            _torch_op(log)(x, 1, dtype=bad_dtype)
        with pytest.raises(NotImplementedError, match="dtype"):
            _op(log)(x, 1, dtype=bad_dtype)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_dim_and_dtype_arguments_as_pytorch_takes_them(log):
    import numpy as np

    x = torch.randn(2, 3)
    expected = _torch_op(log)(x, 1)
    for dim in (np.int64(1), torch.tensor(1), np.int32(-1)):
        torch.testing.assert_close(_torch_op(log)(x, dim), expected)
        torch.testing.assert_close(_op(log)(x, dim), expected)
    for dim in (torch.tensor(1.0), torch.tensor([1]), True, 1.0):
        with pytest.raises(TypeError, match="dim"):
            _op(log)(x, dim)
    y = _op(log)(x, 1, torch.float64)  # dtype positionally, as torch.softmax(input, dim, dtype)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, _torch_op(log)(x, 1, torch.float64))
