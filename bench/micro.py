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
               f"--benchmark-json={out}", "-q", "-p", "no:cacheprovider"]
        log("micro-benchmarks: python -m pytest bench/test_micro.py --benchmark-only")
        env = dict(os.environ)
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
    groups: dict[str, dict] = {}
    for b in data.get("benchmarks", []):
        name = b["name"]
        kind = "compiled" if "compiled" in name else "python"
        groups.setdefault(b["group"] or name, {})[kind] = b["stats"]["median"]
    rows = []
    for g, v in groups.items():
        py, c = v.get("python"), v.get("compiled")
        rows.append({"group": g, "python_us": py * 1e6 if py else None,
                     "compiled_us": c * 1e6 if c else None,
                     "speedup": (py / c) if py and c else None})
    skipped = [g for g in groups if "compiled" not in groups[g]]
    note = None
    if skipped:
        note = "compiled side skipped (extension not built) for: " + ", ".join(skipped)
    return {"rows": rows, "note": note}


def micro_table(m: dict) -> str:
    lines = ["## Micro-benchmarks (pytest-benchmark)", "",
             "`python -m pytest bench/test_micro.py --benchmark-only`: median time per call, the compiled "
             "piece of fastws against a plain-Python version of the same work (see bench/README.md).", ""]
    if m.get("note"):
        lines += [f"_{m['note']}._", ""]
    if m.get("rows"):
        lines += ["| benchmark | plain Python µs | fastws compiled µs | speed-up |", "|---|---:|---:|---:|"]
        for r in m["rows"]:
            def f(v):
                return "—" if v is None else (f"{v:,.2f}" if v < 100 else f"{v:,.0f}")
            sp = "—" if r["speedup"] is None else f"{r['speedup']:.2f}x"
            lines.append(f"| {r['group']} | {f(r['python_us'])} | {f(r['compiled_us'])} | {sp} |")
        lines.append("")
    return "\n".join(lines)
