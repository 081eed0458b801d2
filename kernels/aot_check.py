"""Compile every kernel configuration the launchers can pick for real GPUs (sm_80, sm_90), with no GPU
present, and read what the hardware would run: registers, spills, shared memory, load widths.

The configurations come from the launchers' own plan_* functions, called on meta tensors of
representative shapes, so they cannot drift from what a real launch picks. Each launch is specialised
exactly as Triton's JIT specialises it (integers equal to 1 become constants, pointers and integers
divisible by 16 get the divisibility attribute), so a row stride of 1,001 elements is compiled, and
reported, as the unaligned case it is. Resources come from the ptxas and cuobjdump shipped in the
triton wheel. Triton caches the compiled kernels on disk, so a second check is quick.
"""

import concurrent.futures
import dataclasses
import importlib
import multiprocessing
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource

from . import cross_entropy, grad_norm, normalizers, sanitize, scale, softmax

# compute capability -> multiprocessors of the flagship card (A100, H100 SXM), for the launchers' grids
ARCHS = {80: 108, 90: 132}
CLASS_COUNTS = (1000, 1001, 32_000, 50_257, 128_256, 262_144)  # 50,257: GPT-2; 128,256: Llama 3
ROW_COUNTS = (8192, 64)  # one program per row; rows split across programs
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass
class KernelReport:
    kernel: str
    arch: int
    num_warps: int
    constants: dict  # the constexpr values of this configuration (JIT-specialised 1s included)
    aligned_args: tuple  # the pointer and integer arguments compiled as 16-divisible
    registers: int
    spills: int  # local-memory stores and loads (STL/LDL) in the machine code
    shared_bytes: int
    loads_16_byte: int  # LDG.E.128 instructions
    loads_narrower: int  # every other global load
    loop_instructions: tuple  # SASS instructions per element (per thread) of each main loop, in code order
    examples: list  # the shipped problems that launch this configuration

    @property
    def instructions_per_element(self):
        """Instructions per element of all main loops together: what one element costs the issue slots."""
        return sum(self.loop_instructions)


def _nvidia_tool(name):
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _specialize(kernel, args):
    """(signature, constexprs, attrs) of a launch, by Triton's own JIT specialisation rules."""
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        value = args[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        from triton._C.libtriton import native_specialize_impl

        kind, attr = native_specialize_impl(CUDABackend, value, param.is_const, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        if kind == "constexpr":
            signature[param.name], constexprs[param.name] = "constexpr", value
        else:
            signature[param.name] = kind
            if attr and "D" in attr:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def streams_aligned_data(report):
    """True where the configuration streams its main data through a loop and that data is 16-byte aligned:
    those loads must be 16-byte loads (LDG.E.128)."""
    c, aligned = report.constants, set(report.aligned_args)
    if report.kernel in ("grad_norm_partials_kernel", "grad_scale_kernel"):
        return bool(c["ALIGNED"])
    if report.kernel == "softmax_forward_kernel":
        return {"x_ptr", "y_ptr", "x_row_stride", "n_cols"} <= aligned
    if report.kernel == "softmax_backward_kernel":
        return {"y_ptr", "dy_ptr", "dx_ptr", "dy_row_stride", "n_cols"} <= aligned
    if report.kernel == "sanitize_kernel":
        return {"x_ptr", "n_elements"} <= aligned
    if report.kernel == "scale_kernel":
        return {"x_ptr", "out_ptr", "n_cols", "x_row_stride", "out_row_stride"} <= aligned
    streams = report.kernel == "cross_entropy_stats_kernel" or any(
        c.get(k) for k in ("COMPUTE_STATS", "WRITE_GRAD", "SMOOTHING", "PROB_TARGET"))
    return streams and {"logits_ptr", "logits_row_stride", "n_classes"} <= aligned


def _compile(kernel, signature_items, constexpr_items, attr_items, num_warps, arch):
    src = ASTSource(fn=kernel, signature=dict(signature_items), constexprs=dict(constexpr_items),
                    attrs={k: [list(a) for a in v] for k, v in attr_items})
    # enable_fp_fusion=True is what a JIT launch gets by default in Triton 3.9
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "enable_fp_fusion": True})
    return compiled.asm["cubin"], compiled.metadata.shared


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LOAD_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def _load_bytes(instruction):
    width = re.search(r"LDG\.E(?:\.\w+)*", instruction).group(0).split(".")[-1]
    return _LOAD_BYTES.get(width, 4)


def main_loop_lengths(sass, min_load_bytes, block_size):
    """(instructions, blocks) of one pass through each main loop of the SASS: the outermost loops (backward
    branches) whose body loads at least min_load_bytes per thread (the streamed elements; small loops over a
    few scalars do not), counted along the shortest path through the body (an if/else executes one side: the
    unmasked block is the common one). An inner loop is counted once. blocks: how many BLOCK_SIZE steps one
    pass makes (ptxas unrolls some loops 4 times), from the step of the counter the loop's branch tests."""
    code = [(int(a, 16), text) for a, text in _SASS_LINE.findall(sass)]
    code = [(a, t) for a, t in code if not t.startswith("NOP")]
    branches = [(a, int(m.group(1), 16), t.startswith("BRA"))
                for a, t in code if (m := re.search(r"\bBRA(?:\.\w+)* 0x([0-9a-f]+)", t))]
    loops = [(target, a) for a, target, _ in branches if target < a]
    outermost = [(t, e) for t, e in loops if not any(t2 <= t and e <= e2 and (t2, e2) != (t, e) for t2, e2 in loops)]
    lengths = []
    for start, end in sorted(outermost):
        body = [(a, t) for a, t in code if start <= a <= end]
        if sum(_load_bytes(t) for _, t in body if "LDG" in t) < min_load_bytes:
            continue
        jumps = {a: (target, unconditional) for a, target, unconditional in branches}
        # shortest path from the first instruction to the loop's branch over forward edges
        distance = {start: 1}
        for index, (a, _) in enumerate(body):
            if a not in distance:
                continue
            successors = []
            target, unconditional = jumps.get(a, (None, False))
            if target is not None and a < target <= end:
                successors.append(target)
            if not unconditional and index + 1 < len(body):
                successors.append(body[index + 1][0])
            for b in successors:
                distance[b] = min(distance.get(b, 1 << 30), distance[a] + 1)
        lengths.append((distance.get(end, len(body)), _unrolled(body, block_size)))
    return lengths


def _unrolled(body, block_size):
    """BLOCK_SIZE steps per pass of a loop: the increment of the register its closing branch tests, in blocks."""
    predicate = re.match(r"@!?(U?P\d)", body[-1][1])
    if predicate is None:
        return 1
    name = predicate.group(1)
    moved = [t for _, t in body if re.match(rf"PLOP3\S* {name},", t)]  # a uniform predicate copied over
    if moved and re.search(r"\bUP\d\b", moved[-1]):
        name = re.search(r"\b(UP\d)\b", moved[-1]).group(1)
    tests = [t for _, t in body if re.match(rf"U?ISETP\S* {name},", t)]
    registers = re.findall(r"\bU?R\d+\b", tests[-1]) if tests else []
    for register in registers:
        for _, t in body:
            step = re.match(rf"U?IADD3 {register}, (?:{register}, (0x[0-9a-f]+)|(0x[0-9a-f]+), {register})", t)
            if step:
                value = int(step.group(1) or step.group(2), 16)
                if value % block_size == 0:
                    return value // block_size
    return 1


def _resources(cubin):
    """(registers, spill instructions, 16-byte loads, narrower loads, SASS) of the cubin Triton built.

    Registers from `cuobjdump -res-usage`; spills are the local-memory stores and loads (STL/LDL) in the
    SASS, loads the LDG instructions by width.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage, sass = (subprocess.run([_nvidia_tool("cuobjdump"), flag, path], capture_output=True, text=True,
                                      check=True).stdout for flag in ("-res-usage", "-sass"))
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    spills = len(re.findall(r"\b(?:STL|LDL)\b", sass))
    loads = re.findall(r"\bLDG\.E[.\w]*", sass)
    wide = sum(load.endswith(".128") for load in loads)
    return registers, spills, wide, len(loads) - wide, sass


_ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "i64": 8, "i32": 4, "u8": 1}


def _elements_per_thread(signature, constexprs, num_warps):
    """(elements one thread handles per loop iteration, bytes of the narrowest streamed element)."""
    sizes = [_ELEMENT_BYTES[kind[1:]] for kind in signature.values() if kind[1:] in _ELEMENT_BYTES]
    if "DTYPE" in constexprs:  # the clip kernels stream through a table of pointers of this dtype
        sizes.append(_ELEMENT_BYTES[str(constexprs["DTYPE"])])
    return max(1, constexprs.get("BLOCK_SIZE", 32 * num_warps) // (32 * num_warps)), min(sizes or [4])


def shipped_launches(n_sms):
    """(example, Launch) for every configuration the launchers pick on the representative problems."""
    from nanfuse.cross_entropy import CrossEntropyOptions

    meta = dict(device="meta")
    launches = []
    for dtype in DTYPES:
        name = str(dtype).removeprefix("torch.")
        for n_rows in ROW_COUNTS:
            for n_classes in CLASS_COUNTS:
                logits = torch.empty(n_rows, n_classes, dtype=dtype, **meta)
                target = torch.empty(n_rows, dtype=torch.int64, **meta)
                probs = torch.empty(n_rows, n_classes, dtype=dtype, **meta)
                weight = torch.empty(n_classes, **meta)
                scalars = torch.empty(3, **meta)
                grad = torch.empty_like(logits)
                where = f"{name} {n_rows}x{n_classes}"
                cases = {
                    "ce mean": (target, None, CrossEntropyOptions(), grad),
                    "ce none fwd": (target, None, CrossEntropyOptions(reduction="none"), None),
                    "ce all options": (target, weight, CrossEntropyOptions(label_smoothing=0.1, z_loss=1e-4,
                                                                           softcap=30.0, logit_scale=0.5), grad),
                    "ce probabilities": (probs, None, CrossEntropyOptions(), grad),
                    "ce mean in place": (target, None, CrossEntropyOptions(inplace_backward=True), logits),
                }
                for label, (tgt, w, opts, g) in cases.items():
                    planned, _, stats = cross_entropy.plan_forward(logits, tgt, w, scalars, opts, g, n_sms)
                    launches += [(f"{label} {where}", launch) for launch in planned]
                stats = torch.empty(2, n_rows, **meta)
                upstream = torch.empty(n_rows, **meta)
                launches += [(f"ce none bwd {where}", launch) for launch in cross_entropy.plan_backward(
                    logits, target, None, scalars, CrossEntropyOptions(reduction="none"), stats, upstream, grad, n_sms)]
        for n_classes in CLASS_COUNTS:
            x = torch.empty(64, n_classes, dtype=dtype, **meta)
            for log in (False, True):
                label = f"{'log_' if log else ''}softmax {name} 64x{n_classes}"
                launches += [(label, launch) for launch in softmax.plan_forward(x, torch.empty_like(x), log)]
                launches += [(label, launch) for launch in softmax.plan_backward(x, x, torch.empty_like(x), log)]
        grad = torch.empty(64, 32_000, dtype=dtype, **meta)
        for out, label in ((grad, "in place"), (torch.empty_like(grad), "out of place")):
            launches += [(f"scale {label} {name}", launch) for launch in
                         scale.plan_scale(grad, out, torch.empty((), **meta), n_sms)]
        for shape in ((32, 32, 64), (33, 7)):  # a 16-divisible batch, and an odd one
            launches += [(f"sanitize {name} {shape}", launch) for launch in sanitize.plan_sanitize(
                torch.empty(shape, dtype=dtype, **meta), torch.empty(shape[0], dtype=torch.uint8, **meta), 0.0)]
        grads = [torch.empty(n, dtype=dtype, **meta) for n in (768, 768 * 2304, 50257 * 768)]
        for aligned in (True, False):  # build_tables groups tensors by whether data_ptr % 16 == 0
            tables = [grad_norm._build_table(grads, torch.device("meta"), n_sms, aligned)]
            for norm_type, kind in ((2.0, grad_norm.NORM_2), (1.0, grad_norm.NORM_1), (3.5, grad_norm.NORM_P),
                                    (float("inf"), grad_norm.NORM_INF)):
                for max_norm in (1.0, None):
                    planned, *_ = grad_norm.plan_grad_norm(tables, max_norm, norm_type, kind)
                    launches += [(f"clip {name} p={norm_type}", launch) for launch in planned]
            launches += [(f"clip {name}", launch) for launch in
                         grad_norm.plan_scale(tables, torch.empty((), **meta))]
    for weight in (None, torch.empty(128_256, **meta)):  # the normalisers: one program, whatever the dtype
        for target in (torch.empty(8192, dtype=torch.int64, **meta), torch.empty(64, 128_256, **meta)):
            launches.append((f"ce normalizers {tuple(target.shape)}", normalizers.plan_normalizers(
                target, weight, torch.empty((), **meta), torch.empty(3, **meta), target.shape[0], 128_256, -100,
                True, 1.0)))
    return launches


def check(archs=(90, 80), progress=None, workers=None):
    """A KernelReport per distinct compiled configuration and architecture, for every shipped launch. The
    configurations compile in parallel, one process per core given to this one (Triton's passes and ptxas are
    CPU-bound: the whole check is minutes of CPU on a cold cache)."""
    examples = {}  # configuration -> the shipped problems that launch it, in launch order
    for arch in archs:
        for example, launch in shipped_launches(ARCHS[arch]):
            signature, constexprs, attrs = _specialize(launch.kernel, launch.args)
            key = (launch.kernel.fn.__module__, launch.kernel.fn.__name__, tuple(signature.items()),
                   tuple(constexprs.items()), tuple((k, tuple(tuple(a) for a in v)) for k, v in sorted(attrs.items())),
                   launch.num_warps, arch)
            examples.setdefault(key, []).append(example)
    workers = workers or len(os.sched_getaffinity(0))
    # spawn, not fork: the parent has torch's thread pools running, which a forked child must not inherit
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        reports = []
        for report, shipped in zip(pool.map(_report, examples, chunksize=4), examples.values()):
            report.examples.extend(shipped)
            reports.append(report)
            if progress:
                progress(report)
    return reports


def _report(key):
    """The KernelReport of one configuration (run in a worker process)."""
    module, name, signature, constexprs, attrs, num_warps, arch = key
    kernel = getattr(importlib.import_module(module), name)
    cubin, shared = _compile(kernel, signature, constexprs, attrs, num_warps, arch)
    registers, spills, wide, narrow, sass = _resources(cubin)
    signature, constexprs = dict(signature), dict(constexprs)
    aligned = tuple(kernel.params[i].name for ((i,), _) in attrs)
    per_thread, element_bytes = _elements_per_thread(signature, constexprs, num_warps)
    loops = tuple(round(n / (per_thread * blocks), 2) for n, blocks in main_loop_lengths(
        sass, per_thread * element_bytes, constexprs.get("BLOCK_SIZE", 0) or 1 << 40))
    return KernelReport(name, arch, num_warps, constexprs, aligned, registers, spills, shared, wide, narrow, loops,
                        [])


def _launch_name(r, example):
    aligned = {True: " aligned", False: " unaligned"}.get(r.constants.get("ALIGNED"), "")  # the clip's two tables
    return f"{r.kernel} sm{r.arch} {example}{aligned}"


def loop_costs(reports):
    """{"kernel sm example": main-loop instructions per element} for every shipped launch: what a later
    format_report(before=...) compares against."""
    return {_launch_name(r, example): list(r.loop_instructions) for r in reports for example in r.examples}


def _before(r, before):
    for example in r.examples:
        loops = before.get(_launch_name(r, example))
        if loops is not None:
            return " + ".join(f"{x:g}" for x in loops) or "-"
    return "?"


def format_report(reports, before=None):
    """A markdown table: one row per compiled configuration; with `before` (loop_costs of an earlier build),
    the main-loop instructions per element then and now."""
    lines = ["| kernel | sm | warps | regs | spills | smem B | 16-byte loads | narrower loads | aligned stream | "
             + ("instr/elem before | " if before is not None else "") + "instr/elem per main loop | "
             "constexprs | launched for, e.g. |", "|---|---|---|---|---|---|---|---|---|---|---|---|"
             + ("---|" if before is not None else "")]
    for r in sorted(reports, key=lambda r: (r.kernel, -r.arch, str(r.constants), r.aligned_args)):
        constants = " ".join(f"{k}={getattr(v, 'name', v)}" for k, v in r.constants.items())
        loops = " + ".join(f"{x:g}" for x in r.loop_instructions) or "-"
        lines.append(f"| {r.kernel} | {r.arch} | {r.num_warps} | {r.registers} | {r.spills} | {r.shared_bytes} | "
                     f"{r.loads_16_byte} | {r.loads_narrower} | {'yes' if streams_aligned_data(r) else 'no'} | "
                     + (f"{_before(r, before)} | " if before is not None else "") + f"{loops} | "
                     f"{constants} | {r.examples[0]} (+{len(r.examples) - 1} more) |")
    return "\n".join(lines)


def main(argv=None):
    """python -m nanfuse.kernels.aot_check [--arch 90] [--before loops.json] [--save-loops loops.json] [--out t.md]"""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(ARCHS), help="default: 90 and 80")
    parser.add_argument("--before", help="loop costs saved by --save-loops from an earlier build, for comparison")
    parser.add_argument("--save-loops", help="write this build's main-loop costs (JSON) here")
    parser.add_argument("--out", help="write the markdown table here (default: print it)")
    args = parser.parse_args(argv)
    reports = check(archs=tuple(args.arch or (90, 80)))
    if args.save_loops:
        with open(args.save_loops, "w") as f:
            json.dump(loop_costs(reports), f, indent=0, sort_keys=True)
    before = None
    if args.before:
        with open(args.before) as f:
            before = json.load(f)
    table = format_report(reports, before)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    else:
        print(table)
    spilling = [(r.kernel, r.arch, r.examples[0], r.spills) for r in reports if r.spills]
    print(f"triton {triton.__version__}: {len(reports)} configurations, spilling: {spilling or 'none'}")
    return 1 if spilling else 0


if __name__ == "__main__":
    raise SystemExit(main())
