"""What nanfuse does with the versions and GPUs it meets: the interpreter refuses Triton < 3.7 with NumPy >= 2.4 at
import, naming the fix; a GPU the kernels do not support (ROCm, compute capability < 8.0, no triton) takes the
pure-PyTorch path with one warning (or raises under NANFUSE_BACKEND=triton), and `nanfuse info` says why."""

import os
import re
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy
import pytest
import torch

from nanfuse import _backend, info

_cuda_is_available = torch.cuda.is_available


def _lower_bound(package):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    spec = next(d for d in pyproject["project"]["dependencies"] if re.match(rf"{package}\b", d))
    return tuple(int(p) for p in re.search(r">=\s*([\d.]+)", spec).group(1).split("."))


def _release(version):
    return tuple(int(p) for p in re.match(r"(\d+)\.(\d+)\.(\d+)", version).groups())


def test_installed_versions_are_within_pyproject_bounds():
    import triton

    assert _release(triton.__version__) >= _lower_bound("triton")
    assert _release(torch.__version__) >= _lower_bound("torch")


@pytest.mark.parametrize("triton_version, numpy_version, refused", [
    ("3.6.0", "2.4.0", True), ("3.6.1", "2.5.1", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.0", False),
    ("3.9.0", "2.4.6", False), ("3.6.0", "1.26.4", False), ("3.6.0", "2.4.0rc1", True)])
def test_interpreter_numpy_rule(triton_version, numpy_version, refused):
    message = _backend.interpreter_incompatibility(triton_version, numpy_version)
    assert (message is not None) == refused
    if refused:
        assert "numpy<2.4" in message and "triton>=3.7" in message and triton_version in message


def test_import_refuses_the_interpreter_with_numpy_2_4_on_triton_3_6():
    script = ("import numpy, triton\n"
              "numpy.__version__, triton.__version__ = '2.4.0', '3.6.0'\n"
              "import nanfuse\n")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    for backend, refused in (("interpret", True), ("auto", False)):  # compiled kernels are not affected
        env["NANFUSE_BACKEND"] = backend
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert (result.returncode != 0) == refused, result.stderr[-3000:]
        if refused:
            assert "ImportError" in result.stderr and "numpy<2.4" in result.stderr, result.stderr[-3000:]


def _cuda_tensor(index=0, dtype=torch.float32):
    """What uses_triton reads of a CUDA tensor, on a machine without one."""
    return types.SimpleNamespace(dtype=dtype, is_cuda=True, device=torch.device("cuda", index))


@pytest.fixture
def gpu(monkeypatch):
    """A pretend CUDA machine: set .capability and .name; the per-device cache is cleared around the test."""
    state = types.SimpleNamespace(capability=(9, 0), name="NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: state.capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: state.name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(_backend, "_GPU_SUPPORTED", {})
    return state


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (9, 0), (12, 0)])
def test_supported_gpu_takes_the_kernels(gpu, capability, recwarn):
    gpu.capability = capability
    with _backend.use_backend("auto"):
        assert _backend.uses_triton(_cuda_tensor())
        assert not _backend.uses_triton(_cuda_tensor(dtype=torch.float64))
    with _backend.use_backend("torch"):
        assert not _backend.uses_triton(_cuda_tensor())
    assert not [w for w in recwarn if "nanfuse" in str(w.message)]


@pytest.mark.parametrize("capability, name", [((7, 5), "Tesla T4"), ((7, 0), "Tesla V100-SXM2-16GB"),
                                              ((6, 1), "GeForce GTX 1080")])
def test_pre_sm80_gpu_falls_back_with_one_warning(gpu, capability, name):
    gpu.capability, gpu.name = capability, name
    with _backend.use_backend("auto"):
        with pytest.warns(RuntimeWarning, match=rf"cuda:0 takes the pure-PyTorch path: compute capability "
                                                rf"{capability[0]}\.{capability[1]} \({name}\).*8\.0 or newer"):
            assert not _backend.uses_triton(_cuda_tensor())
        with warnings.catch_warnings(record=True) as again:  # once per device
            warnings.simplefilter("always")
            assert not _backend.uses_triton(_cuda_tensor())
        assert not [w for w in again if "nanfuse" in str(w.message)]
        implementation, reason = info.path_for(torch.device("cuda", 0))
    assert implementation == "pure PyTorch" and f"compute capability {capability[0]}.{capability[1]}" in reason
    with _backend.use_backend("triton"):
        with pytest.raises(RuntimeError, match=rf"NANFUSE_BACKEND=triton.*cuda:0.*compute capability "
                                               rf"{capability[0]}\.{capability[1]}"):
            _backend.uses_triton(_cuda_tensor())


def test_rocm_build_falls_back(gpu, monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    with _backend.use_backend("auto"):
        with pytest.warns(RuntimeWarning, match=r"ROCm \(HIP 6\.2\.41133\)"):
            assert not _backend.uses_triton(_cuda_tensor())
    with _backend.use_backend("triton"):
        with pytest.raises(RuntimeError, match="ROCm"):
            _backend.uses_triton(_cuda_tensor())
        assert info.path_for(torch.device("cuda", 0))[0] == "error (NANFUSE_BACKEND=triton)"


def test_missing_triton_falls_back(gpu, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    with _backend.use_backend("auto"):
        with pytest.warns(RuntimeWarning, match="triton is not importable"):
            assert not _backend.uses_triton(_cuda_tensor())


def test_each_device_is_judged_on_its_own(gpu, monkeypatch):
    capabilities = {0: (9, 0), 1: (7, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capabilities[index])
    with _backend.use_backend("auto"):
        assert _backend.uses_triton(_cuda_tensor(0))
        with pytest.warns(RuntimeWarning, match="cuda:1"):
            assert not _backend.uses_triton(_cuda_tensor(1))


def test_info_names_the_reason_for_an_unsupported_gpu(gpu):
    gpu.capability, gpu.name = (7, 0), "Tesla V100-SXM2-16GB"
    with _backend.use_backend("auto"):
        report = info.describe()
    assert "cuda:0: Tesla V100-SXM2-16GB" in report and f"numpy {numpy.__version__}" in report
    assert "pure PyTorch -- the kernels cannot run here: compute capability 7.0" in report


def test_info_says_mps_takes_the_pytorch_path(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    report = info.describe()
    assert "mps: " in report and "pure PyTorch -- Triton has no mps backend" in report
    mps = types.SimpleNamespace(dtype=torch.float32, is_cuda=False, device=torch.device("mps"))
    assert not _backend.uses_triton(mps)



def test_the_device_check_is_a_constant_under_torch_compile(gpu, monkeypatch):
    # traced instead, the check's host queries and its warning would break the graph of every compiled op
    gpu.capability = (7, 0)
    monkeypatch.setattr(torch.cuda, "is_available", _cuda_is_available)  # Dynamo saves the CUDA RNG state if so

    def step(x):
        return x + 1 if _backend._gpu_supported(0) else x - 1

    with pytest.warns(RuntimeWarning, match="compute capability 7.0"):
        assert torch.compile(step, fullgraph=True, backend="eager")(torch.ones(2)).tolist() == [0.0, 0.0]
