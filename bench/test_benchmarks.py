"""The `nanfuse bench --quick` cases through pytest-benchmark: `pytest bench/ --benchmark-only`.

Each case x implementation is one benchmark; extra_info carries the bytes the op must move, so
GB/s = min_bytes / median. `nanfuse bench` prints the same comparison as tables with the copy
bandwidth of the same run.
"""

import pytest
import torch

from nanfuse.benchmark import cases

CASES = cases.quick_cases(torch.device("cpu"))
IMPLEMENTATIONS = ["nanfuse", "torch eager"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}-{c.name}-{str(c.dtype)[6:]}".replace(" ", "_"))
def test_benchmark(benchmark, case, implementation, device):
    fn = case.setup(device)[implementation]
    fn()  # warm-up
    benchmark.extra_info.update(min_bytes=case.min_bytes, case=case.name, dtype=str(case.dtype))
    benchmark.pedantic(fn, rounds=7, iterations=1, warmup_rounds=1)
