"""The `nanfuse bench --quick` cases and the eager per-call overhead cases through pytest-benchmark:
`pytest bench/ --benchmark-only`.

Each case x implementation is one benchmark; extra_info carries the bytes the op must move, so
GB/s = min_bytes / median. `nanfuse bench` prints the same comparison as tables with the copy
bandwidth of the same run.
"""

import pytest
import torch

from nanfuse._backend import registered_ops
from nanfuse.benchmark import cases, overhead

CASES = cases.quick_cases(torch.device("cpu"))
IMPLEMENTATIONS = ["nanfuse", "torch eager"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}-{c.name}-{str(c.dtype)[6:]}".replace(" ", "_"))
def test_benchmark(benchmark, case, implementation, device):
    fn = case.setup(device)[implementation]
    fn()  # warm-up
    benchmark.extra_info.update(min_bytes=case.min_bytes, case=case.name, dtype=str(case.dtype))
    benchmark.pedantic(fn, rounds=7, iterations=1, warmup_rounds=1)


OVERHEAD_OPS = [name for name, _, _ in overhead.cases(torch.device("cpu"))]


@pytest.mark.parametrize("path", ["nanfuse eager", "nanfuse through the registered op", "torch"])
@pytest.mark.parametrize("op", OVERHEAD_OPS)
def test_eager_call_overhead(benchmark, op, path, device):
    # tiny inputs: the time per call is the cost of getting to the work (Python, autograd, dispatcher)
    _, ours, theirs = next(case for case in overhead.cases(device) if case[0] == op)
    with registered_ops(path == "nanfuse through the registered op"):
        benchmark.pedantic(theirs if path == "torch" else ours, rounds=7, iterations=100, warmup_rounds=1)
