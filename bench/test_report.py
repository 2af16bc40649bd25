"""Checks of the bench's bookkeeping: failed runs stay out of the medians and are shown.

    python -m pytest bench/test_report.py
"""
from __future__ import annotations

from bench import report
from bench.scenarios import BY_KEY


def _run(target, rnd, ok=True, tp=100.0, cpu=10.0, p99=1000.0, error=None, scenario="echo-64"):
    r = {"target": target, "scenario": scenario, "round": rnd, "ok": ok, "error": error, "conns": 64}
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


def _rec(target, scenario, rnd=1, ok=True, **fields):
    r = {"target": target, "scenario": scenario, "round": rnd, "ok": ok, "error": None if ok else "boom",
         "conns": 64}
    if ok:
        r.update(fields)
    return r


def _burst(target, rnd=1, before=20.0, end=60.0, settled=None, status="431", ok=True):
    settled = end if settled is None else settled
    return _rec(target, "burst-431", rnd, ok, throughput=5000.0, cpu_per_unit=100.0, statuses={status: 10000},
                resets=0, proxy_cores=0.99, loadgen_cores=0.5,
                pss_before_mb=before, pss_end_mb=end, pss_settled_mb=settled, pss_growth_mb=settled - before,
                rss_before_mb=before + 10, rss_end_mb=end + 10, rss_settled_mb=settled + 10,
                rss_growth_mb=settled - before)


def test_burst_table_shows_memory_statuses_and_failures():
    runs = [_burst("fastws", 1, 30.0, 95.0), _burst("fastws", 2, 30.0, 90.0, 33.0), _burst("fastws", 3, ok=False),
            _burst("nginx", 1, 21.0, 23.0, status="400")]
    avail = ["noproxy", "fastws", "nginx"]
    s = report.summarize(runs, ["burst-431"], avail)["burst-431"]
    assert s["fastws"]["pss_growth_mb"]["median"] == (65.0 + 3.0) / 2 and s["fastws"]["ok"] == 2
    table = report.scenario_table(BY_KEY["burst-431"], s, avail, {})
    assert "| fastws | 431 ×10,000 |" in table and "| nginx | 400 ×10,000 |" in table
    assert "+34.0 (+3.0 to +65.0)" in table            # settled − before, median (min to max)
    assert "2/3 **FAILED runs**" in table and "boom" in table
    assert "No proxy: not run" in table
    assert "it did not set the pace" in table


def test_burst_table_says_when_the_load_generator_was_the_bottleneck():
    r = _burst("nginx")
    r.update(loadgen_cores=0.97, proxy_cores=0.8)
    s = report.summarize([r], ["burst-431"], ["nginx"])["burst-431"]
    assert "load generator was busier than the proxy for nginx" in report.scenario_table(
        BY_KEY["burst-431"], s, ["nginx"], {})


def test_targets_check_rows_and_bounds():
    def both(sk, f, n, h=None, s=None, **extra):
        rows = [_rec("fastws", sk, **{k: v for k, v in f.items()}), _rec("nginx", sk, **n)]
        if h:
            rows.append(_rec("haproxy", sk, **h))
        if s:
            rows.append(_rec("haproxy-splice", sk, **s))
        return rows
    runs = []
    runs += both("handshake", {"cpu_per_unit": 79.0}, {"cpu_per_unit": 100.0}, {"cpu_per_unit": 50.0})
    runs += both("http", {"cpu_per_unit": 14.0}, {"cpu_per_unit": 16.0})
    runs += both("idle-5k", {"pss_per_tunnel_b": 1100.0}, {"pss_per_tunnel_b": 18000.0})
    runs += [_burst("fastws", before=30.0, end=90.0, settled=34.0), _burst("nginx", before=20.0, end=22.0)]
    runs += both("echo-4k", {"cpu_per_unit": 15.0}, {"cpu_per_unit": 26.0})
    runs += both("bulk-up", {"cpu_per_unit": 0.3, "throughput": 1800.0}, {"cpu_per_unit": 2.0, "throughput": 500.0},
                 s={"cpu_per_unit": 0.35, "throughput": 1700.0})
    runs += both("bulk-down", {"cpu_per_unit": 0.3, "throughput": 1600.0}, {"cpu_per_unit": 2.0, "throughput": 500.0},
                 s={"cpu_per_unit": 0.35, "throughput": 1700.0})
    runs += both("echo-64", {"cpu_per_unit": 13.0}, {"cpu_per_unit": 11.0})
    avail = ["fastws", "nginx", "haproxy", "haproxy-splice"]
    keys = ["handshake", "http", "idle-5k", "burst-431", "echo-4k", "bulk-up", "bulk-down", "echo-64"]
    rows = report.evaluate_targets(report.summarize(runs, keys, avail), avail)
    by = {r["target"].split(":")[0]: r for r in rows}
    assert by["handshake"]["bound"] == 80.0 and by["handshake"]["pass"] is True   # nginx's, not HAProxy's
    assert by["http (small keep-alive GET)"]["bound"] == 16.0 * 0.8 and by["http (small keep-alive GET)"]["pass"] is False
    assert by["idle-5k"]["bound"] == 1024 and by["idle-5k"]["pass"] is False
    assert by["burst-431"]["fastws"] == 4.0 and by["burst-431"]["bound"] == 5.0 and by["burst-431"]["pass"] is True
    assert by["no regression, echo 4 KB"]["bound"] == 0.6 * 26.0 and by["no regression, echo 4 KB"]["pass"] is True
    assert by["no regression, bulk-up"]["bound"] == 0.2 * 2.0 and by["no regression, bulk-up"]["pass"] is True
    assert by["no regression, bulk-down"]["pass"] is False        # MB/s below HAProxy + splice's
    check = [r for r in rows if r["part"] == "check"]
    info = [r for r in rows if r["part"] == "info"]
    assert len(check) == 7 and [r["target"] for r in info] == ["echo CPU per message (64 B) <= 0.8x best peer"]
    md = report.targets_table(rows, None)
    assert "**4 of 7 targets met**" in md
    assert "### For information: a later issue's targets (not part of this check)" in md
    assert md.index("echo CPU per message (64 B)") > md.index("### For information")


def test_bulk_cost_of_frames_is_read_from_the_paced_run_and_mb_s_from_the_saturated_one():
    # saturated bulk lands in one of two modes at random (bench/README.md): the cost of frames
    # in CPU per MB comes from the paced scenario when it ran, MB/s from the saturated one
    runs = []
    for i, (on, off) in enumerate([(0.45, 0.26), (0.26, 0.44), (0.45, 0.25)], 1):    # saturated
        runs += [_run("fastws", i, cpu=on, scenario="bulk-up", tp=2300.0),
                 _run("fastws-blind", i, cpu=off, scenario="bulk-up", tp=2400.0)]
    for i, (on, off) in enumerate([(0.31, 0.30), (0.30, 0.30), (0.33, 0.32)], 1):    # paced
        runs += [_run("fastws", i, cpu=on, scenario="bulk-up-paced", tp=1000.0),
                 _run("fastws-blind", i, cpu=off, scenario="bulk-up-paced", tp=1000.0)]
    runs += [_run("nginx", i, cpu=1.8, scenario=sk, tp=560.0) for i in (1, 2, 3)
             for sk in ("bulk-up", "bulk-up-paced")]
    runs += [_run("haproxy-splice", i, cpu=0.5, scenario="bulk-up", tp=1900.0) for i in (1, 2, 3)]
    avail = ["fastws", "fastws-blind", "nginx", "haproxy-splice"]
    summary = report.summarize(runs, ["bulk-up", "bulk-up-paced"], avail)
    (frames,) = [r for r in report.frames_cost(summary) if r["target"].startswith("bulk-up")]
    assert frames["target"].startswith("bulk-up: CPU per MB at 1,000 MB/s <= 1.05x frames off")
    assert abs(frames["fastws"] - 0.33 / 0.32) < 1e-9 and frames["pass"] is True  # the paced rounds
    assert "MB/s 0.958x" in frames["detail"] and "MB/s from bulk-up" in frames["detail"]
    # against nginx, which cannot keep the pace, saturated against saturated
    (bulk,) = [r for r in report.evaluate_targets(summary, avail)
               if r["target"].startswith("no regression, bulk-up")]
    assert bulk["fastws"] == 0.45 and bulk["bound"] == 0.2 * 1.8 and bulk["pass"] is False
    # a fastws that could not keep the pace is said to be at its limit
    slow = [dict(r, throughput=800.0) if r["scenario"] == "bulk-up-paced" and r["target"] == "fastws" else r
            for r in runs]
    summary = report.summarize(slow, ["bulk-up", "bulk-up-paced"], avail)
    (frames,) = [r for r in report.frames_cost(summary) if r["target"].startswith("bulk-up")]
    assert "0.310 (at its limit, 800 MB/s) and 0.300 ms/MB" in frames["detail"]
    # without the paced run, the saturated one gives both, as before
    summary = report.summarize([r for r in runs if r["scenario"] == "bulk-up"], ["bulk-up"], avail)
    (frames,) = report.frames_cost(summary)
    assert frames["target"].startswith("bulk-up: CPU per MB <= 1.05x") and frames["pass"] is False


def test_the_cost_of_frames_is_judged_round_by_round():
    # the machine drifts between rounds: each round's own ratio is what counts; here the ratio
    # of the medians (12.0 / 9.5 = 1.26x) would fail a tunnel that costs 1% more in two rounds
    cpus = [(9.6, 9.5), (12.0, 11.9), (12.1, 9.4)]       # (frames on, off) in rounds 1 to 3
    runs = [r for i, (on, off) in enumerate(cpus, 1)
            for r in (_run("fastws", i, cpu=on), _run("fastws-blind", i, cpu=off))]
    summary = report.summarize(runs, ["echo-64"], ["fastws", "fastws-blind"])
    ratio = summary["echo-64"]["fastws"]["vs_blind_cpu_per_unit"]
    assert ratio["n"] == 3 and abs(ratio["median"] - 9.6 / 9.5) < 1e-9
    (row,) = report.frames_cost(summary)
    assert row["pass"] is True and row["bound"] == 1.1 and "12.0 µs with frames" in row["detail"]
    # a round without its pair is left out
    runs = runs[:-1]
    summary = report.summarize(runs, ["echo-64"], ["fastws", "fastws-blind"])
    assert summary["echo-64"]["fastws"]["vs_blind_cpu_per_unit"]["n"] == 2
