"""How the benchmarks measure: median time, copy bandwidth, peak extra memory, launches and syncs."""

import ctypes
import platform
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or "CPU"


def median_ms(fn, device, *, min_reps=5, budget_s=1.0):
    """Median milliseconds of fn() after warm-up: triton's do_bench on CUDA, a timer loop on CPU."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()  # warm-up: first-call allocations, lazy imports
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def copy_bandwidth_gbs(device, n_bytes=None):
    """GB/s of a large device-to-device copy (bytes read + bytes written over the time)."""
    n_bytes = n_bytes or (1 << 30 if device.type == "cuda" else 1 << 28)
    src = torch.rand(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * n_bytes / ms / 1e6


class _HeapPeak(TorchDispatchMode):
    """Samples glibc's heap in use (mallinfo2) after every aten op: the peak of live CPU memory."""

    class _MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]

    def __init__(self, mallinfo2):
        super().__init__()
        self.mallinfo2 = mallinfo2
        self.start = self.peak = self.in_use()

    def in_use(self):
        info = self.mallinfo2()
        return info.uordblks + info.hblkhd

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.in_use())
        return out


def _mallinfo2():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _HeapPeak._MallInfo2
        return libc.mallinfo2
    except (OSError, AttributeError):
        return None


def peak_extra_bytes(fn, device):
    """(bytes, how): memory fn() needs beyond what exists before it; None where it cannot be measured."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, "torch.cuda.max_memory_allocated"
    mallinfo2 = _mallinfo2()
    if mallinfo2 is None:
        return None, "unavailable"
    with _HeapPeak(mallinfo2) as heap:
        fn()
    return heap.peak - heap.start, "peak heap growth (glibc mallinfo2, sampled at every aten op)"


def launches_and_syncs(fn, device):
    """(kernel launches, host syncs) of one fn() call on CUDA, from torch.profiler; (None, None) on CPU."""
    if device.type != "cuda":
        return None, None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    names = [event.name for event in prof.events()]
    launches = sum(name in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")
                   for name in names)
    syncs = sum(name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
                for name in names) - 1  # minus the synchronize above
    return launches, max(syncs, 0)
