import os
import warnings

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKEND = os.environ.get("NANFUSE_BACKEND", "auto")

# The interpreter evaluates masked-out lanes too (0 * inf there is discarded by tl.where, but NumPy warns).
warnings.filterwarnings("ignore", message="(invalid value|divide by zero) encountered", category=RuntimeWarning)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
