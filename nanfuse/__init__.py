"""nanfuse: Triton kernels that keep training free of NaNs, with a pure-PyTorch path for CPU tensors."""

from . import _backend  # first: it sets TRITON_INTERPRET=1 for NANFUSE_BACKEND=interpret
from ._backend import current_backend, use_backend
from .cross_entropy import CrossEntropyLoss, cross_entropy
from .softmax import log_softmax, softmax

__all__ = ["CrossEntropyLoss", "cross_entropy", "current_backend", "log_softmax", "softmax", "use_backend"]
__version__ = "0.1.0"
