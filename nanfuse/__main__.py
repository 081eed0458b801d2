"""The `nanfuse` command: `nanfuse bench` and `nanfuse demo` (also `python -m nanfuse ...`)."""

import argparse
import pathlib
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="nanfuse", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="benchmark every op against PyTorch eager, torch.compile and peers")
    bench.add_argument("--quick", action="store_true", help="a reduced set: under a minute on a 2-core CPU")
    bench.add_argument("--out", default="nanfuse-bench", help="folder for results.json, results.md and plots")
    bench.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    bench.add_argument("--only", choices=("cross_entropy", "clip", "overhead"),
                       help="run the cases of one op only, or only the eager per-call overhead table")
    bench.add_argument("--kernels", action="store_true",
                       help="instead: compile every kernel configuration for sm_80/sm_90 and print registers, "
                            "spills, shared memory and load widths (no GPU needed)")
    bench.add_argument("--arch", type=int, choices=(80, 90), default=90, help="with --kernels: the target")
    demo = commands.add_parser("demo", help="train a NaN-prone model three ways and show what happens")
    from .demo import run as demo_run

    demo_run.add_arguments(demo)
    args = parser.parse_args(argv)
    if args.command == "bench" and args.kernels:
        from .kernels import aot_check

        table = aot_check.format_report(aot_check.check(archs=(args.arch,)))
        print(table)
        path = pathlib.Path(args.out)
        path.mkdir(parents=True, exist_ok=True)
        (path / f"kernels-sm{args.arch}.md").write_text(table + "\n")
        print(f"\nresource table: {(path / f'kernels-sm{args.arch}.md').resolve()}")
        return 0
    if args.command == "bench":
        from .benchmark import run

        run(out_dir=args.out, quick=args.quick, device=args.device, only=args.only)
        return 0
    code, _, _ = demo_run.main(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
