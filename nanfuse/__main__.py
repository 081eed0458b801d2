"""The `nanfuse` command: demo, bench, gpu-check and info (also `python -m nanfuse ...`)."""

import argparse
import pathlib
import sys

from . import __version__
from ._cli_types import available_device, positive_float, writable_folder

BENCH_SETS = ("full", "quick", "gpu-check", "tiny")


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, except on/off flags, whose help says what they switch."""

    def _get_help_string(self, action):
        return action.help if action.nargs == 0 else super()._get_help_string(action)


def _parser():
    parser = argparse.ArgumentParser(prog="nanfuse", description=__doc__)
    parser.add_argument("--version", action="version", version=f"nanfuse {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = _Defaults

    demo = commands.add_parser("demo", formatter_class=defaults,
                               help="train a NaN-prone model three ways and show what happens")
    from .demo import run as demo_run

    demo_run.add_arguments(demo)

    bench = commands.add_parser("bench", formatter_class=defaults,
                                help="benchmark every op against PyTorch eager, torch.compile and peers")
    bench.add_argument("--quick", action="store_true", help="the quick set: under a minute on a 2-core CPU")
    bench.add_argument("--set", choices=BENCH_SETS, default=None,
                       help="which cases: full (default), quick (= --quick), gpu-check (the GPU check's), tiny")
    bench.add_argument("--out", type=writable_folder, default="nanfuse-bench",
                       help="folder for results.json, results.md and plots")
    bench.add_argument("--device", type=available_device, default=None, help="cuda or cpu (default: cuda if any)")
    bench.add_argument("--only", choices=("cross_entropy", "softmax", "clip", "linear_ce", "overhead", "watch"),
                       help="run the cases of one op only, or only the eager per-call overhead table, or only "
                            "NanWatch's cost (steps/s: plain, watch, detect_anomaly on the demo's GRU)")
    bench.add_argument("--budget-s", type=positive_float, default=None,
                       help="start no case after this many seconds (the rest are listed as not run)")
    bench.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    bench.add_argument("--kernels", action="store_true",
                       help="instead: compile every kernel configuration for sm_80/sm_90 and print registers, "
                            "spills, shared memory and load widths (no GPU needed)")
    bench.add_argument("--arch", type=int, choices=(80, 90), default=90, help="with --kernels: the target")

    check = commands.add_parser("gpu-check", formatter_class=defaults,
                                help="on a GPU machine: tests, compute-sanitizer and the bench in one run")
    check.add_argument("--out", type=writable_folder, default="gpu-check", help="folder for every result")
    check.add_argument("--repo", default=".", help="the nanfuse source tree whose tests/ to run")
    check.add_argument("--budget-s", type=positive_float, default=480.0, help="the whole run's time limit")
    check.add_argument("--dry-run", action="store_true",
                       help="the same stages at toy size on the CPU (no tests, no sanitizer)")

    commands.add_parser("info", help="versions, devices, and which implementation each op takes where")
    return parser


def _bench(args):
    import time

    import torch

    from .benchmark import cases, run

    if args.kernels:
        from .kernels import aot_check

        table = aot_check.format_report(aot_check.check(archs=(args.arch,)))
        print(table)
        path = pathlib.Path(args.out)
        path.mkdir(parents=True, exist_ok=True)
        (path / f"kernels-sm{args.arch}.md").write_text(table + "\n")
        print(f"\nresource table: {(path / f'kernels-sm{args.arch}.md').resolve()}")
        return 0
    name = args.set or ("quick" if args.quick else "full")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    chosen = {"full": cases.full_cases, "quick": cases.quick_cases, "gpu-check": cases.gpu_check_cases,
              "tiny": cases.tiny_cases}[name](device)
    deadline = None if args.budget_s is None else time.monotonic() + args.budget_s
    run(out_dir=args.out, quick=name == "quick", cases=chosen, device=str(device), only=args.only,
        progress=args.progress, deadline=deadline)
    return 0


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    if args.command == "gpu-check":
        from .benchmark import gpu_check

        gpu_check.main(args.out, args.repo, args.budget_s, args.dry_run)
        return 0
    if args.command == "info":
        from .info import describe

        print(describe())
        return 0
    from .demo import run as demo_run

    code, _, _ = demo_run.main(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
