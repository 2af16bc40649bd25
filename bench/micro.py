"""Run the pytest-benchmark micro-benchmarks (bench/test_micro.py) and summarize them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_micro(log=print, timeout: float = 600) -> dict:
    """Returns {"rows": [...], "note": str|None}; never raises."""
    try:
        import pytest_benchmark  # noqa: F401
    except ImportError:
        return {"rows": [], "note": "pytest-benchmark is not installed (pip install pytest-benchmark): "
                                    "micro-benchmarks not run"}
    with tempfile.TemporaryDirectory(prefix="fastws-micro-") as d:
        out = Path(d) / "micro.json"
        cmd = [sys.executable, "-m", "pytest", str(HERE / "test_micro.py"), "--benchmark-only",
               f"--benchmark-json={out}", "-q", "-rsfE", "-p", "no:cacheprovider"]
        log("micro-benchmarks: python -m pytest bench/test_micro.py --benchmark-only")
        env = dict(os.environ)
        env["COLUMNS"] = "400"          # pytest's summary lines whole, reasons included
        env["PYTHONPATH"] = str(HERE.parent) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        allcpus = os.sched_getaffinity(0) | set(range(os.cpu_count() or 1))

        def pre():
            try:
                os.sched_setaffinity(0, allcpus)
            except OSError:
                pass
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent,
                               env=env, preexec_fn=pre)
        except subprocess.TimeoutExpired:
            return {"rows": [], "note": "micro-benchmarks timed out"}
        if not out.exists():
            tail = (r.stdout + r.stderr).strip().splitlines()[-3:]
            return {"rows": [], "note": "micro-benchmarks produced no results: " + " | ".join(tail)}
        data = json.loads(out.read_text())
    return summarize(data, r.stdout + r.stderr, r.returncode)


def summarize(data: dict, output: str = "", returncode: int = 0) -> dict:
    """Rows from pytest-benchmark's JSON: one per group (what was measured), the median of its
    plain-Python side and of its fastws side; a note for what did not run."""
    groups: dict[str, dict] = {}
    for b in data.get("benchmarks", []):
        name = b["name"]
        kind = (b.get("extra_info") or {}).get("side")         # "python" or "compiled"
        kind = kind or ("compiled" if "compiled" in name else "python")
        groups.setdefault(b["group"] or name, {})[kind] = b["stats"]["median"]
    rows = []
    for g, v in groups.items():
        py, c = v.get("python"), v.get("compiled")
        rows.append({"group": g, "python_us": py * 1e6 if py else None,
                     "compiled_us": c * 1e6 if c else None,
                     "speedup": (py / c) if py and c else None})
    notes = []
    # pytest's short summary (-rsfE): why a side was skipped, which test failed or errored
    lines = output.splitlines()
    skipped = sorted({line.split(": ", 1)[-1].strip() for line in lines
                      if line.startswith("SKIPPED") and "non-benchmark" not in line})
    failed, why = [], []
    for line in lines:
        if line.startswith(("FAILED ", "ERROR ")):
            test, _, reason = line.split(" ", 1)[1].partition(" - ")
            failed.append(test.rpartition("::")[2])
            if reason and reason not in why:
                why.append(reason)
    if skipped:
        notes.append("Skipped: " + "; ".join(skipped))
    if failed:
        notes.append("Failed: " + ", ".join(failed) + (f" ({'; '.join(why)})" if why else ""))
    elif returncode not in (0, 5):
        notes.append(f"pytest exited with status {returncode}")
    missing = [g for g, v in groups.items() if "python" not in v or "compiled" not in v]
    if missing and not skipped and not failed:
        notes.append("One side only for: " + ", ".join(missing))
    return {"rows": rows, "note": ". ".join(n.rstrip(".") for n in notes) if notes else None}


def micro_table(m: dict) -> str:
    lines = ["## Micro-benchmarks (pytest-benchmark)", "",
             "`python -m pytest bench/test_micro.py --benchmark-only`: median time per call, fastws's "
             "compiled engine against a plain-Python version of the same work, the whole process on "
             "one CPU (see bench/README.md).", ""]
    if m.get("note"):
        lines += [f"_{m['note']}._", ""]
    if m.get("rows"):
        lines += ["| benchmark | plain Python µs | fastws µs | speed-up |", "|---|---:|---:|---:|"]
        for r in m["rows"]:
            def f(v):
                return "—" if v is None else (f"{v:,.2f}" if v < 100 else f"{v:,.0f}")
            sp = "—" if r["speedup"] is None else f"{r['speedup']:.2f}x"
            lines.append(f"| {r['group']} | {f(r['python_us'])} | {f(r['compiled_us'])} | {sp} |")
        lines.append("")
    return "\n".join(lines)
