"""The (log-)softmax's forward and backward bodies over rows, shared by the autograd Function
(nanfuse/softmax.py) and the registered ops (nanfuse/_ops.py); they call the kernels or the PyTorch fallback
(passes over memory: see nanfuse/softmax.py)."""

import torch

from . import _backend


def implementation(use_triton):
    """The kernels' module, or the PyTorch fallback's."""
    if use_triton:
        from .kernels import softmax
    else:
        from .fallback import softmax
    return softmax


def rows_forward(x, log, use_triton=None):
    """(log-)softmax of each row of a 2-D tensor with contiguous rows, into a new tensor of x's dtype (by the
    kernels or the chunked PyTorch path; `use_triton` default the backend's choice for x)."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if y.numel() and _backend.has_values(x):
        use_triton = _backend.uses_triton(x) if use_triton is None else use_triton
        with _backend.no_autocast(x):
            implementation(use_triton).softmax_forward(x, y, log)
    return y


def rows_backward(y, dy, log, use_triton=None):
    """Input gradient of rows_forward from its output y and the upstream gradient dy, by the kernels (or
    the chunked PyTorch path; `use_triton` as forward chose, default the backend's choice for y)."""
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    dx = torch.empty_like(y, memory_format=torch.contiguous_format)
    if dx.numel() and _backend.has_values(y):
        use_triton = _backend.uses_triton(y) if use_triton is None else use_triton
        with _backend.no_autocast(y):
            implementation(use_triton).softmax_backward(y, dy, dx, log)
    return dx


def differentiable_rows_backward(y, dy, log):
    """rows_backward's formula in PyTorch ops (fp32 math, y's dtype), so autograd and torch.func can
    differentiate and batch it: softmax dx = y (dy - sum(dy y)); log_softmax dx = dy - exp(y) sum(dy)."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    out, up = y.to(acc), dy.to(acc)
    if log:
        dx = up - out.exp() * up.sum(-1, keepdim=True)
    else:
        dx = out * (up - (up * out).sum(-1, keepdim=True))
    return dx.to(y.dtype)


def needs_differentiable_backward(*tensors):
    """True when backward must build a graph (create_graph=True), runs under a torch.func transform, or gets
    a batch of upstream gradients: the kernels write into plain tensors, which neither autograd nor vmap can
    see through."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return True
    functorch = torch._C._functorch  # is_grads_batched and jacobian(vectorize=True) use autograd's legacy vmap
    return any(functorch.is_functorch_wrapped_tensor(t) or functorch.is_legacy_batchedtensor(t) for t in tensors)
