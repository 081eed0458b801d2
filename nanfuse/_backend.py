"""Which implementation runs an op: compiled Triton, the Triton interpreter, or pure PyTorch.

- NANFUSE_BACKEND unset or "auto": CUDA tensors take the Triton kernels, everything else PyTorch.
- "torch": always the pure-PyTorch path.
- "triton": the Triton kernels for CUDA tensors (as auto), PyTorch for the rest.
- "interpret": the Triton kernels for every tensor, CPU tensors through the Triton interpreter.
  TRITON_INTERPRET=1 is set here, when nanfuse is imported, before any kernel module is.
float64 always takes the PyTorch path (in float64), so torch.autograd.gradcheck works.
A CUDA tensor on a GPU the kernels do not support (a ROCm build, compute capability below 8.0, no importable
triton) takes the PyTorch path under "auto" (one RuntimeWarning per device) and raises under "triton".
use_backend() and registered_ops() hold per thread.
"""

import contextlib
import importlib.util
import os
import re
import sys
import threading
import warnings

import torch
from torch._subclasses.fake_tensor import FakeTensor

BACKENDS = ("auto", "torch", "triton", "interpret")

_env_backend = os.environ.get("NANFUSE_BACKEND", "auto").strip().lower() or "auto"
if _env_backend not in BACKENDS:
    raise ValueError(f"NANFUSE_BACKEND must be one of {BACKENDS}, got {_env_backend!r}")


def _interpret_loaded_triton_language():
    """Make triton.language's own @triton.jit helpers (tl.max, tl.sum, ...) interpretable when triton was
    imported before nanfuse set TRITON_INTERPRET=1 (torch's testing utilities import it): @triton.jit reads
    the variable when it decorates, so those helpers were built as compiled JITFunctions, which raise
    "Cannot call @triton.jit'd outside of the scope of a kernel" inside an interpreted kernel. Each is
    replaced by the InterpretedFunction a fresh import would have made; nanfuse's kernels are decorated later.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    language = sys.modules["triton.language"]
    modules = [module for name, module in list(sys.modules.items())
               if module is not None and name.startswith("triton.language.")]
    interpreted = {}
    for owner in [language, language.tensor, *modules]:
        for name, value in list(vars(owner).items()):
            if isinstance(value, JITFunction):
                if value.fn not in interpreted:
                    interpreted[value.fn] = InterpretedFunction(value.fn)
                setattr(owner, name, interpreted[value.fn])


def _release(version: str) -> tuple:
    """(major, minor) of a version string such as "3.6.0" or "2.4.0rc1"."""
    return tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", version).groups())


def interpreter_incompatibility(triton_version: str, numpy_version: str):
    """Why this Triton's interpreter cannot run nanfuse's kernels with this NumPy, or None when it can.

    Triton before 3.7 converts a 1-element array to a Python int where a kernel uses a runtime scalar as a
    loop bound (`range(0, n_cols, BLOCK_SIZE)`); NumPy 2.4 made that a TypeError, so nearly every
    interpreted kernel fails (3.7.0, 3.8.0 and 3.9.0 squeeze the array first). Compiled kernels are unaffected.
    """
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (f"NANFUSE_BACKEND=interpret: the Triton interpreter of triton {triton_version} fails with "
                f"NumPy {numpy_version} (NumPy 2.4 refuses the array-to-int conversion it does for loop "
                f"bounds). Install 'numpy<2.4' or 'triton>=3.7'; compiled kernels are not affected.")
    return None


if _env_backend == "interpret":
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton.language" in sys.modules:
        _interpret_loaded_triton_language()
    import numpy
    import triton

    _problem = interpreter_incompatibility(triton.__version__, numpy.__version__)
    if _problem:
        raise ImportError(_problem)

_thread_state = threading.local()  # .override: the innermost use_backend; .ops_in_eager: registered_ops()


def current_backend() -> str:
    """The backend in force in this thread: the innermost use_backend(...) if any, else NANFUSE_BACKEND."""
    return getattr(_thread_state, "override", None) or _env_backend


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops this thread calls in this block on one backend ("auto", "torch", "triton"; "interpret"
    needs the env var). Other threads keep theirs; a backward keeps the choice its forward made."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "interpret" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the interpreter must be chosen before import: set NANFUSE_BACKEND=interpret")
    previous, _thread_state.override = getattr(_thread_state, "override", None), name
    try:
        yield
    finally:
        _thread_state.override = previous


@contextlib.contextmanager
def without_interpreter():
    """Benchmarks and the demo measure real paths: under NANFUSE_BACKEND=interpret they run as "auto"."""
    if current_backend() != "interpret":
        yield
        return
    with use_backend("auto"):
        yield


MIN_COMPUTE_CAPABILITY = (8, 0)  # the kernels are built and checked (kernels/aot_check.py) for sm_80 and sm_90


def unsupported_gpu_reason(device_index: int):
    """Why the compiled kernels cannot run on CUDA device `device_index`, or None when they can."""
    if torch.version.hip is not None:
        return (f"a ROCm (HIP {torch.version.hip}) build of PyTorch: nanfuse's kernels are built and checked "
                "for NVIDIA GPUs only")
    if importlib.util.find_spec("triton") is None:
        return "triton is not importable"
    capability = torch.cuda.get_device_capability(device_index)
    if capability < MIN_COMPUTE_CAPABILITY:
        return (f"compute capability {capability[0]}.{capability[1]} ({torch.cuda.get_device_name(device_index)}): "
                f"nanfuse's kernels need {MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]} or newer")
    return None


_GPU_SUPPORTED = {}  # device index -> whether the compiled kernels can run there


@torch.compiler.assume_constant_result  # a property of the device: Dynamo calls it while tracing, keeps the result
def _gpu_supported(device_index: int) -> bool:
    """unsupported_gpu_reason is None, computed once per device; warns once when the kernels cannot run."""
    if device_index not in _GPU_SUPPORTED:
        reason = unsupported_gpu_reason(device_index)
        if reason:
            warnings.warn(f"nanfuse: cuda:{device_index} takes the pure-PyTorch path: {reason}", RuntimeWarning,
                          stacklevel=3)
        _GPU_SUPPORTED[device_index] = reason is None
    return _GPU_SUPPORTED[device_index]


def uses_triton(tensor: torch.Tensor, as_real: bool = False) -> bool:
    """True when the op on `tensor` should run the Triton kernels rather than pure PyTorch. as_real: the choice
    for the real tensor a FakeTensor stands for (a fake implementation's output shapes follow the real op's path)."""
    if tensor.dtype == torch.float64:
        return False
    backend = current_backend()
    if backend == "torch":
        return False
    if tensor.is_cuda:
        if backend == "interpret":  # the interpreter runs on the host: any GPU will do
            return True
        index = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
        if _gpu_supported(index):
            return True
        if backend == "triton":
            raise RuntimeError(f"NANFUSE_BACKEND=triton, but the Triton kernels cannot run on cuda:{index}: "
                               f"{unsupported_gpu_reason(index)}; use NANFUSE_BACKEND=auto for the PyTorch path")
        return False
    # the interpreter runs on values: a FakeTensor, or any tensor under FakeTensorMode or make_fx (whose tracer would
    # not see the kernel's writes), takes the PyTorch path, which propagates shapes and is traced
    return backend == "interpret" and tensor.device.type == "cpu" and (as_real or (
        not isinstance(tensor, FakeTensor) and (torch.compiler.is_compiling() or not _tracing())))


def has_values(tensor: torch.Tensor) -> bool:
    """False for a meta tensor and a FakeTensor (FakeTensorMode, tracing): shapes only, nothing to compute,
    and the Triton interpreter cannot run on them."""
    return tensor.device.type != "meta" and not isinstance(tensor, FakeTensor)


_FAKE_MODE, _PROXY_MODE = torch._C._TorchDispatchModeKey.FAKE, torch._C._TorchDispatchModeKey.PROXY


def _tracing():
    """True under FakeTensorMode or make_fx's proxy mode, where even a real tensor's results have no values to
    read (fake results, or a graph being traced); checked only when some dispatch mode is on (cheap otherwise).
    Not for Dynamo to trace (a graph break): callers ask torch.compiler.is_compiling() first."""
    get_mode = torch._C._get_dispatch_mode
    return torch._C._is_tracing() or bool(torch._C._len_torch_dispatch_stack()) and (
        get_mode(_FAKE_MODE) is not None or get_mode(_PROXY_MODE) is not None)


def may_read_values(tensor: torch.Tensor) -> bool:
    """True where reading a tensor's value into Python costs no device sync: CPU, in eager mode, with values (not
    a FakeTensor, nothing tracing it)."""
    return (tensor.device.type == "cpu" and not torch.compiler.is_compiling() and not isinstance(tensor, FakeTensor)
            and not _tracing())


def eager_pytorch_on_cpu(tensor: torch.Tensor) -> bool:
    """True where an op on `tensor` runs the PyTorch path eagerly on the host: a CPU tensor with values (not a
    FakeTensor, nothing tracing it), not the interpreter, not through the registered ops, not under torch.compile.
    There, values are read for free and a small call may use PyTorch's own ops. One check for the per-call fast
    paths (cheaper than its parts called apart)."""
    state = _thread_state.__dict__
    return (tensor.is_cpu and (state.get("override") or _env_backend) != "interpret" and not state.get("ops_in_eager")
            and not torch.compiler.is_compiling() and not isinstance(tensor, FakeTensor) and not _tracing())


def through_registered_ops() -> bool:
    """True when calls go through the torch.library ops (nanfuse/_ops.py): always under torch.compile, and
    in eager mode only inside registered_ops(). Eager calls otherwise take the autograd Functions
    directly, which skips the dispatcher's per-call cost (measured by `nanfuse bench --only overhead`).
    """
    return getattr(_thread_state, "ops_in_eager", False) or torch.compiler.is_compiling()


@contextlib.contextmanager
def registered_ops(enabled: bool = True):
    """Route this thread's eager calls through the registered ops too (what torch.compile sees): for tests
    and benchmarks."""
    previous, _thread_state.ops_in_eager = getattr(_thread_state, "ops_in_eager", False), enabled
    try:
        yield
    finally:
        _thread_state.ops_in_eager = previous


def no_autocast(tensor: torch.Tensor):
    """A context that turns autocast off on the tensor's device, so the kernels and their PyTorch twins take
    half-precision inputs as they are (autocast would upcast some ops' inputs to an fp32 copy)."""
    device_type = tensor.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
