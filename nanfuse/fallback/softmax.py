"""Softmax and log-softmax in pure PyTorch, row-chunked like the kernels, fp32 accumulation.

An all -inf row gives softmax 0 and log_softmax -inf, never NaN.
"""

import torch

from .cross_entropy import _acc_dtype, _row_chunks


def softmax_forward(x, y, log):
    acc = _acc_dtype(x)
    for rows in _row_chunks(*x.shape):
        chunk = x[rows].to(acc)
        m = chunk.amax(1, keepdim=True)
        shift = torch.where(m == float("-inf"), 0.0, m)
        e = torch.sub(chunk, shift).exp_()
        s = e.sum(1, keepdim=True)
        if log:
            y[rows] = (chunk - shift) - torch.where(s == 0, 0.0, s.log())
        else:
            y[rows] = e.mul_(torch.where(s == 0, 0.0, 1.0 / s))
    return y


def softmax_backward(y, dy, dx, log):
    acc = _acc_dtype(y)
    for rows in _row_chunks(*y.shape):
        out, up = y[rows].to(acc), dy[rows].to(acc)
        if log:
            dx[rows] = up - out.exp() * up.sum(1, keepdim=True)
        else:
            dx[rows] = out * (up - (up * out).sum(1, keepdim=True))
    return dx
