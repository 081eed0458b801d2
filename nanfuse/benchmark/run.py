"""`nanfuse bench`: every case on the present device, one table per op, JSON and a PNG plot per op."""

import gc
import json
import os
import pathlib
import time

import torch

from .. import _backend
from . import cases as case_sets
from . import overhead
from .measure import copy_bandwidth_gbs, device_name, launches_and_syncs, median_ms, peak_extra_bytes

OP_TITLES = [("cross_entropy", "cross-entropy forward+backward"), ("softmax", "softmax forward+backward"),
             ("clip", "gradient-norm clip"), ("linear_ce", "linear + cross-entropy forward+backward")]
COLUMNS = ["implementation", "case", "dtype", "median ms", "min bytes", "GB/s", "of copy BW",
           "peak extra MB", "launches", "syncs"]


def _progress(items, enabled):
    try:
        from tqdm import tqdm
    except ImportError:  # the bench extra brings tqdm; without it, one line per case
        for i, item in enumerate(items):
            if enabled:
                print(f"[{i + 1}/{len(items)}] {item.op} {item.name}", flush=True)
            yield item
        return
    yield from tqdm(items, disable=not enabled, unit="case")


def _memory_available_bytes():
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def run_case(case, device, copy_gbs):
    """Rows for every implementation of one case; a failing implementation gets a row saying why."""
    rows = []
    impls = case.setup(device)
    for name, fn in impls.items():
        row = dict(implementation=name, op=case.op, case=case.name, dtype=str(case.dtype).replace("torch.", ""),
                   size=case.size, min_bytes=case.min_bytes, variant=case.variant)
        try:
            ms = median_ms(fn, device, min_reps=case.min_reps, budget_s=1.0 if case.min_reps > 1 else 0.0)
            peak, peak_how = peak_extra_bytes(fn, device) if name != "torch.compile" or device.type == "cuda" \
                else (None, "not measured: compiled code allocates outside the dispatcher on CPU")
            launches, syncs = launches_and_syncs(fn, device)
            gbs = case.min_bytes / ms / 1e6
            row.update(median_ms=ms, gbs=gbs, fraction_of_copy=gbs / copy_gbs, peak_extra_bytes=peak,
                       peak_how=peak_how, launches=launches, syncs=syncs)
        except Exception as error:  # e.g. a peer library that rejects this dtype: report, go on
            row.update(error=f"{type(error).__name__}: {error}"[:200])
        rows.append(row)
    del impls
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def format_table(rows, op, header):
    def cell(row, column):
        value = {"implementation": row["implementation"], "case": row["case"], "dtype": row["dtype"],
                 "median ms": row.get("median_ms"), "min bytes": row["min_bytes"], "GB/s": row.get("gbs"),
                 "of copy BW": row.get("fraction_of_copy"),
                 "peak extra MB": None if row.get("peak_extra_bytes") is None else row["peak_extra_bytes"] / 2**20,
                 "launches": row.get("launches"), "syncs": row.get("syncs")}[column]
        if column == "of copy BW" and value is not None:
            return f"{value:.1%}"
        if column == "min bytes":
            return f"{value / 1e6:.1f} MB"
        if isinstance(value, float):
            return f"{value:.3g}" if value < 100 else f"{value:.0f}"
        return "-" if value is None else str(value)

    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        if row["op"] != op:
            continue
        if "error" in row:
            lines.append(f"| {row['implementation']} | {row['case']} | {row['dtype']} | failed: {row['error']} |")
        else:
            lines.append("| " + " | ".join(cell(row, c) for c in COLUMNS) + " |")
    return "\n".join(lines)


def plot(rows, op, path, title):
    """One panel per case family (dtype and variant), the cases along x and the implementations side by side
    as bars of achieved GB/s, so each nanfuse bar stands next to its PyTorch ones; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    families = {}
    for row in rows:
        if row["op"] == op and "gbs" in row:
            families.setdefault(f"{row['dtype']} {row['variant']}".strip(), []).append(row)
    if not families:
        return False
    fig, axes = plt.subplots(len(families), 1, figsize=(9, 2.8 * len(families) + 0.6), squeeze=False)
    for ax, (family, family_rows) in zip(axes[:, 0], sorted(families.items())):
        case_names = list(dict.fromkeys(row["case"] for row in sorted(family_rows, key=lambda r: r["size"])))
        impls = list(dict.fromkeys(row["implementation"] for row in family_rows))
        width = 0.8 / len(impls)
        for k, impl in enumerate(impls):
            gbs = {row["case"]: row["gbs"] for row in family_rows if row["implementation"] == impl}
            xs = [i + (k - (len(impls) - 1) / 2) * width for i, name in enumerate(case_names) if name in gbs]
            ax.bar(xs, [gbs[name] for name in case_names if name in gbs], width, label=impl)
        ax.set_xticks(range(len(case_names)), [name.split(" ")[0] if op != "clip" else name for name in case_names],
                      fontsize=8)
        ax.set_title(family, fontsize=9)
        ax.set_ylabel("GB/s")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{title}: achieved GB/s (minimum bytes / median time)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def run(out_dir="nanfuse-bench", quick=False, cases=None, device=None, progress=True, echo=print, only=None,
        deadline=None):
    """Run the suite (or its `only` op), print the tables, write results.json and one PNG per op into out_dir.
    With `deadline` (a time.monotonic() value) the cases not started by then are skipped and listed."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = device_name(device)
    cases = cases if cases is not None else (case_sets.quick_cases if quick else case_sets.full_cases)(device)
    cases = [c for c in cases if only is None or c.op == only]
    notes = []
    if device.type == "cpu":
        budget = _memory_available_bytes() // 6
        too_big = [c for c in cases if c.min_bytes > budget]
        cases = [c for c in cases if c.min_bytes <= budget]
        notes += [f"skipped {c.op} {c.name} {c.dtype}: more than this CPU's memory allows" for c in too_big]
    if quick:
        notes.append("quick shapes are small: on a CPU much of the data stays in cache, so a fraction of the "
                     "copy bandwidth above 100% means cache, not memory, served it")
    if cases and not any(c.compile_ok for c in cases):
        notes.append("torch.compile: not run in this set (a cold compile takes ~20 s to minutes on a CPU)")
    if device.type == "cuda" and not __import__("importlib").util.find_spec("liger_kernel"):
        notes.append("liger-kernel: skipped, not importable")
    copy_gbs = copy_bandwidth_gbs(device)
    echo(f"nanfuse bench on {name}: device-to-device copy {copy_gbs:.1f} GB/s")
    rows = []
    with _backend.without_interpreter():
        for case in _progress(cases, progress and bool(cases)):
            if deadline is not None and time.monotonic() > deadline:
                notes.append(f"not run (time budget spent): {case.op} {case.name} {case.dtype}")
                continue
            rows.extend(run_case(case, device, copy_gbs))
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = []
    for op, title in OP_TITLES:
        if any(row["op"] == op for row in rows):
            header = f"### {title} on {name} (copy bandwidth {copy_gbs:.1f} GB/s)"
            tables.append(format_table(rows, op, header))
            echo("\n" + tables[-1])
            if plot(rows, op, out / f"{op}.png", f"{title} on {name}"):
                echo(f"plot: {out / f'{op}.png'}")
    watch_rows = []
    if only == "watch":
        from . import watch

        watch_rows = watch.measure(device)
        tables.append(watch.format_table(watch_rows, name))
        echo("\n" + tables[-1])
    overhead_rows = []
    if only in (None, "overhead"):
        overhead_rows = overhead.measure(device)
        tables.append(overhead.format_table(overhead_rows, name))
        echo("\n" + tables[-1])
    peak_how = sorted({row["peak_how"] for row in rows if row.get("peak_how")})
    notes += [f"peak extra memory: {how}" for how in peak_how]
    for note in notes:
        echo(f"note: {note}")
    results = dict(device=name, device_type=device.type, copy_gbs=copy_gbs, quick=quick, notes=notes,
                   torch=torch.__version__, rows=rows, overhead=overhead_rows, watch=watch_rows)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text("\n\n".join(tables + ["\n".join(f"- {n}" for n in notes)]) + "\n")
    echo(f"results: {out / 'results.json'} and {out / 'results.md'} in {os.path.abspath(out)}")
    return results
