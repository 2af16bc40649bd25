"""Checks of the bench's bookkeeping: failed runs stay out of the medians and are shown.

    python -m pytest bench/test_report.py
"""
from __future__ import annotations

from bench import report
from bench.scenarios import BY_KEY


def _run(target, rnd, ok=True, tp=100.0, cpu=10.0, p99=1000.0, error=None):
    r = {"target": target, "scenario": "echo-64", "round": rnd, "ok": ok, "error": error, "conns": 64}
    if ok:
        r.update(throughput=tp, cpu_per_unit=cpu,
                 lat_us={"p50": p99 / 2, "p99": p99, "p999": p99 * 2},
                 result={"reconnects": 0, "total_count": 1000})
    return r


def test_failed_runs_are_not_averaged_in():
    runs = [_run("nginx", 1, tp=100), _run("nginx", 2, tp=110), _run("nginx", 3, tp=120),
            _run("fastws", 1, tp=200), _run("fastws", 2, ok=False, error="3 errors: echo mismatch"),
            _run("fastws", 3, tp=220)]
    s = report.summarize(runs, ["echo-64"], ["fastws", "nginx"])["echo-64"]
    assert s["nginx"]["throughput"] == {"median": 110, "min": 100, "max": 120, "n": 3}
    assert s["fastws"]["throughput"]["n"] == 2
    assert s["fastws"]["ok"] == 2 and s["fastws"]["runs"] == 3
    table = report.scenario_table(BY_KEY["echo-64"], s, ["fastws", "nginx"], {})
    assert "2/3 **FAILED runs**" in table
    assert "echo mismatch" in table
    assert "| nginx | 110 (100–120) | 1.00x |" in table


def test_all_rounds_failed_is_marked_failed():
    runs = [_run("fastws", 1, ok=False, error="boom"), _run("nginx", 1)]
    s = report.summarize(runs, ["echo-64"], ["fastws", "nginx"])["echo-64"]
    table = report.scenario_table(BY_KEY["echo-64"], s, ["fastws", "nginx"], {})
    assert "| fastws | **FAILED** |" in table


def test_skipped_target_is_said_so():
    runs = [_run("nginx", 1)]
    s = report.summarize(runs, ["echo-64"], ["nginx"])["echo-64"]
    table = report.scenario_table(BY_KEY["echo-64"], s, ["fastws", "nginx"], {"fastws": "not installed"})
    assert "| fastws | skipped |" in table


def test_targets_check_uses_best_peer():
    runs = [_run("nginx", 1, cpu=10.0, p99=3000), _run("haproxy", 1, cpu=8.0, p99=2500),
            _run("haproxy-splice", 1, cpu=12.0, p99=4000), _run("fastws", 1, cpu=6.0, p99=2000),
            _run("noproxy", 1, p99=1000)]
    for r in runs:
        if r["target"] == "noproxy":
            r.pop("cpu_per_unit")
    avail = ["noproxy", "fastws", "nginx", "haproxy", "haproxy-splice"]
    summary = report.summarize(runs, ["echo-64"], avail)
    rows = {r["target"]: r for r in report.evaluate_targets(summary, avail)}
    cpu = rows["echo CPU per message (64 B) <= 0.8x best peer"]
    assert cpu["bound"] == 0.8 * 8.0 and cpu["pass"] is True        # 6.0 <= 0.8 x HAProxy's 8.0
    lat = rows["p99 latency added over no proxy, echo 64 B <= best peer's"]
    assert lat["fastws"] == 1000 and lat["bound"] == 1500 and lat["pass"] is True
    # without fastws nothing passes or fails, but the bounds are still shown
    summary = report.summarize([r for r in runs if r["target"] != "fastws"], ["echo-64"], avail)
    rows = report.evaluate_targets(summary, [a for a in avail if a != "fastws"])
    assert all(r["pass"] is None for r in rows) and rows[0]["bound"] == 0.8 * 8.0
