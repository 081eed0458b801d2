"""`nanfuse gpu-check`: everything a lent GPU should answer, in one run of under eight minutes.

Stages, each in its own process with its own time limit, so a crash or a hang in one is recorded and the
next still runs:
  env        versions (nanfuse, torch, triton, Python, CUDA, driver) and the card;
  tests      the whole test suite (its `device` fixture adds cuda), verbose, stopping at nothing;
  memcheck   compute-sanitizer memcheck over nanfuse.benchmark.kernel_smoke (every kernel, small sizes);
  racecheck  the same under racecheck;
  bench      `nanfuse bench --set gpu-check`: nanfuse, PyTorch eager, torch.compile and Liger-Kernel;
then one Markdown file, <card>.md, with all of it, ready to commit as bench/results/<card>.md.
`--dry-run` runs the stages at toy size on the CPU (no tests, no sanitizer: the kernel smoke once, the
bench's cross-entropy table on tiny shapes), so the suite can check that this script works without a GPU.
bench/gpu-check.sh is the wrapper to run on the GPU machine.
"""

import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import time

# seconds per stage within the default 480 s budget; bench gets what the others leave
STAGE_LIMITS = {"env": 30, "tests": 170, "memcheck": 45, "racecheck": 45}
BENCH_RESERVE_S = 20  # kept for writing the report after the bench's own deadline


def _run(command, log_path, limit_s, cwd, env=None):
    """Run a command with a time limit, its stdout+stderr into log_path; (exit code or 'timeout', seconds)."""
    start = time.monotonic()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        try:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, timeout=limit_s,
                                  env=env).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        except OSError as error:  # e.g. the tool is not on this machine
            log.write(f"could not start: {error}\n")
            code = "not started"
    return code, time.monotonic() - start


def environment():
    """Versions and devices as a dict of strings."""
    import torch

    import nanfuse

    info = {"nanfuse": nanfuse.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "cuda (torch)": str(torch.version.cuda)}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not importable"
    if torch.cuda.is_available():
        info["card"] = torch.cuda.get_device_name(0)
        major, minor = torch.cuda.get_device_capability(0)
        info["compute capability"] = f"sm_{major}{minor}"
        info["devices"] = str(torch.cuda.device_count())
    smi = shutil.which("nvidia-smi")
    if smi:
        query = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
        info["nvidia-smi"] = query.stdout.strip() or query.stderr.strip()
    for name in ("liger_kernel", "hypothesis", "numpy", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # not installed, or broken: either way it is what the run had
            info[name] = "not importable"
    return info


def card_slug(info):
    name = info.get("card", "cpu-dry-run")
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _sanitizer():
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for candidate in ("/usr/local/cuda/bin/compute-sanitizer", "/opt/cuda/bin/compute-sanitizer"):
        if os.path.exists(candidate):
            return candidate
    return None


def _test_summary(log_text):
    """The closing line of a pytest run and its failed/errored test ids."""
    closing = [line for line in log_text.splitlines() if re.match(r"^=+ .*(passed|failed|error).* in ", line)]
    failures = re.findall(r"^(?:FAILED|ERROR) (\S+)", log_text, flags=re.MULTILINE)
    return (closing[-1].strip("= ") if closing else "no closing line (killed or crashed)"), failures


def _sanitizer_summary(log_text):
    errors = re.findall(r"ERROR SUMMARY: (\d+) error", log_text)
    hazards = re.findall(r"RACECHECK SUMMARY: (\d+) hazard", log_text)
    found = [f"{errors[-1]} errors"] if errors else []
    found += [f"{hazards[-1]} hazards"] if hazards else []
    return ", ".join(found) or "no summary (see log)"


def main(out_dir, repo, budget_s=480.0, dry_run=False, echo=print):
    """Run every stage into out_dir; returns the path of the report. Never raises for a failing stage."""
    started = time.monotonic()
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    repo = pathlib.Path(repo).resolve()
    cwd = os.getcwd()  # bench/gpu-check.sh runs this from the folder that holds the nanfuse package to test
    python = sys.executable
    stages = {}

    info = environment()
    (out / "env.json").write_text(json.dumps(info, indent=1))
    stages["env"] = ("ok", time.monotonic() - started, "env.json")
    echo(f"gpu-check on {info.get('card', 'CPU (dry run)')}: torch {info['torch']}, triton {info['triton']}")

    device = "cpu" if dry_run else "cuda"
    if dry_run:
        stages["tests"] = ("skipped (dry run)", 0.0, "")
    else:
        echo("tests ...")
        command = [python, "-m", "pytest", str(repo / "tests"), "-v", "-rfE", "-p", "no:cacheprovider",
                   "--rootdir", str(repo), "-c", str(repo / "pyproject.toml"), "-o", "console_output_style=classic"]
        code, seconds = _run(command, out / "tests.log", STAGE_LIMITS["tests"], cwd)
        summary, failures = _test_summary((out / "tests.log").read_text(errors="replace"))
        stages["tests"] = (f"exit {code}: {summary}", seconds, "tests.log")
        (out / "tests-failed.txt").write_text("\n".join(failures) + "\n")

    sanitizer = None if dry_run else _sanitizer()
    smoke = [python, "-m", "nanfuse.benchmark.kernel_smoke", "--device", device]
    for tool in ("memcheck", "racecheck"):
        log = out / f"{tool}.log"
        if dry_run and tool == "racecheck":
            stages[tool] = ("skipped (dry run)", 0.0, "")
        elif dry_run:
            code, seconds = _run(smoke, log, STAGE_LIMITS[tool], cwd)
            stages[tool] = (f"kernel smoke without the sanitizer: exit {code}", seconds, log.name)
        elif sanitizer is None:
            log.write_text("compute-sanitizer not found on PATH or in /usr/local/cuda/bin\n")
            stages[tool] = ("compute-sanitizer not found", 0.0, log.name)
        else:
            echo(f"{tool} ...")
            code, seconds = _run([sanitizer, "--tool", tool, "--error-exitcode", "9"] + smoke, log,
                                 STAGE_LIMITS[tool], cwd)
            stages[tool] = (f"exit {code}: {_sanitizer_summary(log.read_text(errors='replace'))}", seconds,
                            log.name)

    echo("bench ...")
    left = budget_s - (time.monotonic() - started) - BENCH_RESERVE_S
    bench_dir = out / "bench"
    command = [python, "-m", "nanfuse", "bench", "--set", "tiny" if dry_run else "gpu-check", "--device", device,
               "--out", str(bench_dir), "--budget-s", f"{max(left - 30, 10):.0f}", "--no-progress"]
    if dry_run:  # one small table shows the runner works; the per-call overhead loop alone takes a minute here
        command += ["--only", "cross_entropy"]
    code, seconds = _run(command, out / "bench.log", max(left, 20), cwd)
    stages["bench"] = (f"exit {code}", seconds, "bench.log, bench/")

    report = out / f"{card_slug(info)}.md"
    report.write_text(format_report(info, stages, bench_dir, time.monotonic() - started, dry_run))
    echo(f"report: {report.resolve()}")
    return report


def format_report(info, stages, bench_dir, total_s, dry_run):
    """The Markdown report: environment, stages with their outcome and time, the bench tables."""
    title = info.get("card", "CPU dry run")
    lines = [f"# nanfuse GPU check on {title}", "",
             "Written by `bash bench/gpu-check.sh` (`nanfuse gpu-check`)"
             + (" as a dry run on the CPU: no GPU number here." if dry_run else "."), "",
             "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in info.items()]
    lines += ["", "| stage | outcome | seconds | files |", "|---|---|---|---|"]
    lines += [f"| {name} | {outcome} | {seconds:.0f} | {files} |" for name, (outcome, seconds, files) in stages.items()]
    lines += ["", f"Total {total_s:.0f} s.", ""]
    results = bench_dir / "results.md"
    lines.append(results.read_text() if results.exists() else "No bench results: see bench.log.")
    return "\n".join(lines) + "\n"
