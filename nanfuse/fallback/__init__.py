"""The pure-PyTorch implementation of every op: the CPU path, same math and numerics as the kernels."""
