import os

import pytest
import torch

if os.environ.get("NANFUSE_CHECK_LAUNCHES") == "1":  # .ci/compat: the run must launch every kernel
    from launch_coverage import pytest_configure, pytest_sessionfinish  # noqa: F401  pytest's hooks

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
