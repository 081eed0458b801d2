"""The backend choice: which implementation a tensor gets, and that the interpreter run really runs kernels."""

import os

import pytest
import torch

import nanfuse
from nanfuse import _backend


def test_env_backend_routes_cpu_tensors():
    cpu = torch.ones(2)
    if os.environ.get("NANFUSE_BACKEND") == "interpret":
        assert os.environ["TRITON_INTERPRET"] == "1"
        assert _backend.uses_triton(cpu)
        from nanfuse.kernels import cross_entropy

        assert type(cross_entropy.cross_entropy_kernel).__name__ == "InterpretedFunction"
    else:
        assert not _backend.uses_triton(cpu)
    assert not _backend.uses_triton(cpu.double())  # fp64 always takes the PyTorch path


def test_use_backend_overrides_and_restores():
    before = nanfuse.current_backend()
    with nanfuse.use_backend("torch"):
        assert nanfuse.current_backend() == "torch"
        assert not _backend.uses_triton(torch.ones(1))
    assert nanfuse.current_backend() == before
    with pytest.raises(ValueError, match="backend"):
        with nanfuse.use_backend("cuda-please"):
            pass
