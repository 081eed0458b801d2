"""The backend choice: which implementation a tensor gets, and that the interpreter run really runs kernels."""

import os
import subprocess
import sys
import threading

import pytest
import torch
from helpers import assert_close
from reference import cross_entropy_ref, softmax_ref

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
    with nanfuse.use_backend("triton"):  # the kernels for CUDA tensors only
        assert not _backend.uses_triton(torch.ones(1))
    assert nanfuse.current_backend() == before
    with pytest.raises(ValueError, match="backend"):
        with nanfuse.use_backend("cuda-please"):
            pass


def test_use_backend_is_per_thread():
    seen = {}
    entered, release = threading.Event(), threading.Event()

    def other_thread():
        with nanfuse.use_backend("torch"):
            entered.set()
            release.wait(10)
            seen["inside"] = nanfuse.current_backend()

    worker = threading.Thread(target=other_thread)
    worker.start()
    entered.wait(10)
    seen["main"] = nanfuse.current_backend()  # while the other thread is inside its block
    release.set()
    worker.join()
    assert seen == {"inside": "torch", "main": _backend._env_backend}


def test_two_threads_get_their_own_results():
    # the interpreter patches triton.language while a kernel runs: unserialised, two threads corrupt each other
    inputs = [torch.randn(6, 40) * (k + 1) for k in range(2)]
    targets = [torch.randint(0, 40, (6,)) for _ in range(2)]
    expected = [(softmax_ref(x, 1), cross_entropy_ref(x, t)) for x, t in zip(inputs, targets)]
    errors, barrier = [], threading.Barrier(2)

    def work(k):
        try:
            barrier.wait(10)
            for _ in range(3):
                assert_close(nanfuse.softmax(inputs[k], dim=1), expected[k][0], what=f"softmax in thread {k}")
                assert_close(nanfuse.cross_entropy(inputs[k], targets[k]), expected[k][1], what=f"loss in thread {k}")
        except BaseException as error:  # noqa: BLE001  reported in the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]


def test_interpret_works_when_triton_was_imported_first():
    # torch's testing utilities import triton before a test file imports nanfuse
    script = ("import triton, triton.language, torch\n"
              "import nanfuse\n"
              "x = torch.randn(3, 50)\n"
              "torch.testing.assert_close(nanfuse.log_softmax(x, 1), torch.log_softmax(x, 1))\n"
              "t = torch.randint(0, 50, (3,))\n"
              "torch.testing.assert_close(nanfuse.cross_entropy(x, t), torch.nn.functional.cross_entropy(x, t))\n"
              "assert type(triton.language.max).__name__ == 'InterpretedFunction'\n")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["NANFUSE_BACKEND"] = "interpret"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
