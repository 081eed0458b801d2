"""Triton kernels and their launchers; installed as nanfuse.kernels.

Import these modules only through nanfuse's backend choice: with NANFUSE_BACKEND=interpret it sets
TRITON_INTERPRET=1 first, which must happen before any @triton.jit function is defined.
"""
