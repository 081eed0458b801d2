"""`nanfuse info`: versions, devices, and which implementation each op takes on each device, and why."""

import importlib.util
import os
import platform

import numpy
import torch

from . import __version__, _backend

OPS = ("cross_entropy", "softmax / log_softmax", "clip_grad_norm_ / NanGuard")


def _devices():
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append(torch.device("mps"))
    return devices


def _device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "Apple GPU (Metal)" if device.type == "mps" else platform.processor() or "CPU"


def path_for(device, dtype=torch.float32):
    """(implementation, reason) that nanfuse's ops take for a tensor of `dtype` on `device`."""
    backend = _backend.current_backend()
    if dtype == torch.float64:
        return "pure PyTorch (float64)", "float64 always takes the PyTorch path, so gradcheck works"
    if backend == "torch":
        return "pure PyTorch", "NANFUSE_BACKEND=torch"
    if device.type not in ("cpu", "cuda"):
        return "pure PyTorch", f"Triton has no {device.type} backend"
    if importlib.util.find_spec("triton") is None and backend == "interpret":
        return "pure PyTorch", "triton is not importable"
    if device.type == "cuda" and backend != "interpret":
        reason = _backend.unsupported_gpu_reason(device.index)
        if reason and backend == "triton":
            return "error (NANFUSE_BACKEND=triton)", f"the kernels cannot run here: {reason}"
        if reason:
            return "pure PyTorch", f"the kernels cannot run here: {reason}"
    probe = torch.empty(0, dtype=dtype, device=device)
    if not _backend.uses_triton(probe):
        return "pure PyTorch", f"{device.type} tensors take the PyTorch path unless NANFUSE_BACKEND=interpret"
    if device.type == "cuda":
        return "compiled Triton", f"a CUDA tensor ({torch.cuda.get_device_name(device)})"
    return "Triton interpreter", "NANFUSE_BACKEND=interpret (TRITON_INTERPRET=1): slow, for tests"


def describe():
    """The report `nanfuse info` prints, as text."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not importable"
    lines = [f"nanfuse {__version__}", f"python {platform.python_version()}", f"torch {torch.__version__}",
             f"triton {triton_version}", f"numpy {numpy.__version__} (the interpreter's array library)",
             f"CUDA (torch build) {torch.version.cuda}", f"ROCm (torch build) {torch.version.hip}",
             f"NANFUSE_BACKEND={os.environ.get('NANFUSE_BACKEND', '') or 'auto'} "
             f"(in force: {_backend.current_backend()})", ""]
    for device in _devices():
        lines.append(f"{device}: {_device_name(device)}")
        for dtype in (torch.float32, torch.float64):
            implementation, reason = path_for(device, dtype)
            lines.append(f"  {str(dtype).replace('torch.', ''):8} all ops ({', '.join(OPS)}): "
                         f"{implementation} -- {reason}")
    if not torch.cuda.is_available():
        lines.append("no CUDA device: every op runs its pure-PyTorch path (or the interpreter when asked)")
    return "\n".join(lines)
