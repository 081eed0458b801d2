"""Gradient norm with NaN/Inf check and the in-place scale, per device: the bodies shared by nanfuse.clip (and so
NanGuard) and the registered ops (nanfuse/_ops.py). Triton: one read of all gradients for the norm and flag, a
one-program finalize; the scale is one read and one write, none when its factor is 1. Elsewhere the PyTorch
fallback (nanfuse/fallback/grad_norm.py)."""

import collections
import contextlib
import functools
import math
import threading

import torch

from . import _backend
from .fallback import grad_norm as torch_path


def norm_kind(norm_type):
    """(norm_type as a float, the kernels' kind: 0 inf, 1, 2, 3 any other p), or a ValueError naming it."""
    try:
        norm_type = float(norm_type)
    except (TypeError, ValueError):
        raise ValueError(f"norm_type must be a number > 0 or inf, got {norm_type!r}") from None
    if norm_type == math.inf:
        return norm_type, 0
    if not 0 < norm_type < math.inf:  # (not math.isfinite: Dynamo cannot trace it with dynamic=True)
        raise ValueError(f"norm_type must be a number > 0 or inf, got {norm_type}")
    return norm_type, {1.0: 1, 2.0: 2}.get(norm_type, 3)


def _takes_triton(grads):
    return not any(g.dtype == torch.float64 for g in grads) and _backend.uses_triton(grads[0])


def device_norm(grads, max_norm, norm_type):
    """_device_norm in eager mode: the kernels for CUDA tensors, the PyTorch path otherwise."""
    if not _takes_triton(grads):
        return torch_path.grad_norm(grads, max_norm, norm_type), functools.partial(torch_path.scale_, grads)
    from .kernels import grad_norm as kernels

    device = grads[0].device
    dense, strided = _split_by_layout(grads)
    copies = [g.contiguous() for g in strided]  # the table holds raw pointers: keep these alive until launched
    tables = _tables(dense + copies, device)
    if not tables:
        zeros = torch.zeros(2, dtype=torch.int64, device=device)
        finite_norm = torch.zeros((), dtype=torch.float64, device=device)
        return torch_path.finish(finite_norm, zeros, max_norm, torch.float32), lambda coef: None
    with _launching(device):
        result = kernels.grad_norm(tables, max_norm, norm_type, norm_kind(norm_type)[1])
    return result, _triton_scaler(dense, strided, None if strided else tables)


def device_scale_(grads, factor):
    """Multiply gradients on one device by the 0-dim device tensor `factor`, in place (free when it is 1)."""
    if not _takes_triton(grads):
        torch_path.scale_(grads, factor)
    else:
        _triton_scaler(*_split_by_layout(grads))(factor)


def _split_by_layout(grads):
    """(contiguous, strided) non-empty gradients: the kernels' tables take the first kind only."""
    return ([g for g in grads if g.numel() and g.is_contiguous()],
            [g for g in grads if g.numel() and not g.is_contiguous()])


def _triton_scaler(dense, strided, dense_tables=None):
    """A function that scales the contiguous gradients through the kernels' tables, the strided ones by foreach."""
    from .kernels import grad_norm as kernels

    if not dense and not strided:
        return lambda coef: None
    if dense_tables is None:
        dense_tables = _tables(dense, (dense or strided)[0].device)

    def scale_(coef):
        with _launching(coef.device):
            kernels.scale_(dense_tables, coef)
        if strided:
            torch._foreach_mul_(strided, coef)

    return scale_


_INTERPRETER_LOCK = threading.Lock()


def _launching(device):
    """A lock held around launches through the Triton interpreter (CPU tensors), which keeps global state
    while it runs a kernel and fails when two threads use it at once; compiled launches need none."""
    return _INTERPRETER_LOCK if device.type == "cpu" else contextlib.nullcontext()


_TABLES = collections.OrderedDict()  # the last _TABLES_KEPT gradient sets seen, least recently used first
_TABLES_KEPT = 16
_CAPTURED_TABLES = {}  # sets used while a CUDA graph was captured: a replay reads them, so they are never freed
_TABLES_LOCK = threading.Lock()


def _capturing(device):
    """True while a CUDA graph is being captured on the current stream of `device`."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _tables(grads, device):
    """Device-side pointer tables per dtype and alignment, cached while the same gradient tensors come back.

    A captured graph bakes in the tables' addresses (and the pinned buffer their upload reads), so tables
    used during a capture move to _CAPTURED_TABLES and stay alive for the life of the process; the others
    are kept least-recently-used. Thread-safe.
    """
    key = (device, tuple((g.data_ptr(), g.numel(), g.dtype) for g in grads))
    capturing = _capturing(device)
    with _TABLES_LOCK:
        tables = _CAPTURED_TABLES.get(key, _TABLES.get(key))
    if tables is None:
        from .kernels import grad_norm as kernels

        tables = kernels.build_tables(grads, device) if grads else []
    with _TABLES_LOCK:
        if key in _CAPTURED_TABLES:
            return _CAPTURED_TABLES[key]
        if capturing:
            _TABLES.pop(key, None)
            _CAPTURED_TABLES[key] = tables
            return tables
        tables = _TABLES.setdefault(key, tables)  # another thread may have built the same set meanwhile
        _TABLES.move_to_end(key)
        while len(_TABLES) > _TABLES_KEPT:
            _TABLES.popitem(last=False)
    return tables
