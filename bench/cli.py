"""python -m bench: fastws against nginx, HAProxy and no proxy, side by side in one run."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import signal
import sys
import time
from pathlib import Path

from . import build, deps, report
from .runner import Runner, idle_tunnels, nofile_hard
from .scenarios import BY_KEY, SCENARIOS
from .targets import ALL, make_targets

HERE = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine_info() -> dict:
    model = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for prog, flag in (("nginx", "-v"), ("haproxy", "-v")):
        exe = deps.which(prog)
        if exe:
            import subprocess
            r = subprocess.run([exe, flag], capture_output=True, text=True)
            text = (r.stdout + r.stderr).strip().splitlines()
            versions[prog] = text[0].split(" - ")[0].strip() if text else "?"
    return {
        "kernel": platform.release(),
        "cpu_model": model,
        "cores": os.cpu_count(),
        "usable_cores": sorted(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "nofile_hard_limit": nofile_hard(),
        "versions": versions,
    }


def git_commit() -> str | None:
    import subprocess
    try:
        r = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except OSError:
        return None


def pinning() -> tuple[set[int] | None, set[int] | None, str]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        proxy = {cpus[1]}
        load = set(cpus) - proxy
        return load, proxy, (f"proxy pinned to CPU {cpus[1]}; load generator, backend and harness on "
                             f"CPU {','.join(map(str, sorted(load)))}")
    return None, None, "only one CPU usable: nothing pinned, proxy and load share it"


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--rounds", type=int, default=None, help="rounds of every scenario × target (default 3, --quick 1)")
    ap.add_argument("--duration", type=float, default=None, help="measured seconds per run (default 5, --quick 1.5)")
    ap.add_argument("--warmup", type=float, default=None, help="unmeasured seconds before each run (default 1, --quick 0.3)")
    ap.add_argument("--quick", action="store_true", help="short smoke run (about 3 minutes)")
    ap.add_argument("--targets", default=",".join(ALL), help=f"comma list from: {','.join(ALL)}")
    ap.add_argument("--scenarios", default=",".join(s.key for s in SCENARIOS),
                    help=f"comma list from: {','.join(s.key for s in SCENARIOS)}")
    ap.add_argument("--out", default=str(HERE / "results"), help="directory for JSON, Markdown and PNGs (default bench/results)")
    ap.add_argument("--results-md", choices=("auto", "yes", "no"), default="auto",
                    help="write bench/RESULTS.md (auto: only for full runs with the default scenarios)")
    ap.add_argument("--fastws-processes", type=int, default=None, help="add `processes = N` to the fastws config")
    ap.add_argument("--haproxy-splice", choices=("always", "auto"), default="always",
                    help="HAProxy + splice: `option splice-request` + `option splice-response` "
                         "(always, the default: the faster of the two for bulk here) or `option splice-auto`")
    ap.add_argument("--fastws-option", action="append", default=[], metavar="KEY=VALUE",
                    help="add a top-level line to the fastws config, VALUE in TOML (e.g. worker_connections=20000)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the generated configs and logs")
    ap.add_argument("--micro", choices=("auto", "yes", "no"), default="auto",
                    help="also run the pytest-benchmark micro-benchmarks (auto: on full runs, not --quick)")
    ap.add_argument("--list", action="store_true", help="list scenarios and targets and exit")
    ap.add_argument("--from-json", metavar="FILE",
                    help="measure nothing: rebuild tables, plots and report from a results.json")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.list:
        for s in SCENARIOS:
            print(f"{s.key:10} {s.title}: {s.what}")
        print("targets:", ", ".join(ALL))
        return 0
    if args.from_json:
        raw = json.loads(Path(args.from_json).read_text())
        write_md = args.results_md == "yes" or (args.results_md == "auto" and not raw["meta"]["quick"]
                                               and not raw["meta"]["interrupted"]
                                               and len(raw["meta"]["scenarios"]) == len(SCENARIOS))
        failed = write_outputs(raw["meta"], raw["runs"], Path(args.out), write_md,
                               plots_ok=deps.ensure_matplotlib(log) is None)
        return 1 if failed else 0
    rounds = args.rounds or (1 if args.quick else 3)
    duration = args.duration or (1.5 if args.quick else 5.0)
    warmup = args.warmup if args.warmup is not None else (0.3 if args.quick else 1.0)
    if rounds < 1 or rounds > 20 or duration <= 0 or duration > 120:
        print("--rounds must be 1..20 and --duration 0..120 s", file=sys.stderr)
        return 2
    tnames = [t.strip() for t in args.targets.split(",") if t.strip()]
    snames = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for t in tnames:
        if t not in ALL:
            print(f"unknown target {t!r}; known: {', '.join(ALL)}", file=sys.stderr)
            return 2
    for s in snames:
        if s not in BY_KEY:
            print(f"unknown scenario {s!r}; known: {', '.join(BY_KEY)}", file=sys.stderr)
            return 2
    # keep the table order fixed: no proxy, fastws, nginx, HAProxy, HAProxy + splice
    tnames = [t for t in ALL if t in tnames]
    scenarios = [s for s in SCENARIOS if s.key in snames]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m bench" + ("" if not argv else " " + " ".join(shlex.quote(a) for a in argv))

    notes: list[str] = []
    load_cpus, proxy_cpus, pin_note = pinning()
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)   # the harness stays off the proxy's core
    notes.append(pin_note)
    if any(t in tnames for t in ("nginx", "haproxy", "haproxy-splice")):
        notes += deps.ensure_debian_packages(log)
    mpl_note = deps.ensure_matplotlib(log)
    if mpl_note:
        notes.append(mpl_note)
    exes = build.build_all(log)
    targets = make_targets(tnames, 0, args.fastws_processes, args.haproxy_splice,
                           dict(o.split("=", 1) for o in args.fastws_option if "=" in o))
    skipped = {t.name: t.note for t in targets if not t.available}
    for t in targets:
        if not t.available:
            log(f"SKIP {t.label}: {t.note}")
            notes.append(f"{t.label} skipped: {t.note}")
        elif t.note:
            log(f"{t.label}: {t.note}")
    for sc in scenarios:
        if sc.idle and idle_tunnels(sc) < sc.conns:
            n = idle_tunnels(sc)
            notes.append(f"{sc.key}: {n:,} tunnels instead of {sc.conns:,}: the per-process open files hard "
                         f"limit here is {nofile_hard():,} and a one-process proxy needs two per tunnel "
                         f"(client side and upstream side) plus its own")
    log(pin_note)
    live = [t for t in targets if t.available]
    fastws_version = None
    for t in live:
        if t.name == "fastws":
            import subprocess
            try:
                r = subprocess.run([*t.cmd, "-V"], capture_output=True, text=True, timeout=20,
                                   env=dict(os.environ, **(t.env or {})))
                fastws_version = (r.stdout or r.stderr).strip().splitlines()[0] if r.returncode == 0 else None
            except (OSError, subprocess.TimeoutExpired, IndexError):
                pass
            fastws_version = f"{fastws_version or 'fastws (version unknown)'}: {t.note}"
    total = rounds * sum(1 for sc in scenarios for t in live if Runner.applies(t, sc))
    log(f"{rounds} round(s) × {len(scenarios)} scenario(s) × {len(live)} target(s) = {total} runs, "
        f"{warmup:g} s warm-up + {duration:g} s measured each"
        + ("; the burst is a fixed 10,000 heads instead (no proxy: not run)" if any(s.burst for s in scenarios) else ""))

    runner = Runner(exes, targets, scenarios, rounds=rounds, duration=duration, warmup=warmup,
                    load_cpus=load_cpus, proxy_cpus=proxy_cpus, log=log, keep_tmp=args.keep_tmp)
    started = dt.datetime.now(dt.timezone.utc)
    commit_at_start = git_commit()
    done = {"n": 0}

    def on_record(rec, sc, t):
        done["n"] += 1
        head = f"[{done['n']}/{total}] round {rec['round']} {sc.key:9} {t.label:17}"
        if not rec["ok"]:
            log(f"{head} FAILED: {rec.get('error')}")
            return
        parts = []
        if sc.burst:
            parts.append(f"{rec['throughput']:,.0f} heads/s, status " + report.statuses_text(rec.get("statuses", {})))
            parts.append(f"PSS {rec['pss_before_mb']:.1f} → {rec['pss_end_mb']:.1f} → {rec['pss_settled_mb']:.1f} MB "
                         f"(settled {rec['pss_growth_mb']:+.1f} MB)")
        elif sc.idle:
            parts.append(f"{rec['throughput']:,.0f} tunnels")
            if "pss_per_tunnel_b" in rec:
                parts.append(f"PSS {rec['pss_per_tunnel_b']:,.0f} B/tunnel")
        else:
            parts.append(f"{rec['throughput']:,.1f} {sc.rate_label}")
        if "lat_us" in rec:
            parts.append(f"p99 {rec['lat_us']['p99']:,.0f} µs")
        if "cpu_per_unit" in rec:
            parts.append(f"CPU {rec['cpu_per_unit']:.3g} {sc.cpu_label.split(' ', 2)[-1]}")
        log(f"{head} " + ", ".join(parts))

    def on_signal(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    interrupted = False
    try:
        runner.run(on_record)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: writing what was measured so far")
        notes.append("run interrupted before the end: partial results")
    finally:
        runner.cleanup()
    finished = dt.datetime.now(dt.timezone.utc)

    info = machine_info()
    meta = {
        "command": command,
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": finished.isoformat(timespec="seconds"),
        "rounds": rounds, "duration_s": duration, "warmup_s": warmup, "quick": args.quick,
        "targets": tnames, "skipped": skipped, "scenarios": [s.key for s in scenarios],
        "machine": info, "pinning": pin_note, "notes": notes, "interrupted": interrupted,
        "haproxy_splice": args.haproxy_splice,
        "fastws": fastws_version,
        "git_commit": commit_at_start,
        "git_commit_at_end": git_commit(),
    }
    if args.keep_tmp:
        log(f"generated configs and logs kept in {runner.tmp}")
    if args.micro == "yes" or (args.micro == "auto" and not args.quick and not interrupted):
        from .micro import run_micro
        meta["micro"] = run_micro(log)
    write_md = args.results_md == "yes" or (args.results_md == "auto" and not args.quick and not interrupted
                                           and len(scenarios) == len(SCENARIOS))
    failed_runs = write_outputs(meta, runner.runs, out, write_md, plots_ok=not mpl_note,
                                scrub=[(str(runner.tmp), "$TMPDIR/fastws-bench")])
    return 1 if failed_runs or interrupted else 0


def _scrub(text: str, extra: list[tuple[str, str]]) -> str:
    """Keep this machine's paths out of the written results."""
    pairs = list(extra) + [(str(HERE.parent), "."), (sys.prefix, "$PREFIX"), (os.path.expanduser("~"), "~")]
    for a, b in pairs:
        if a and len(a) > 1:
            text = text.replace(a, b)
    return text


def write_outputs(meta: dict, runs: list[dict], out: Path, write_md: bool, plots_ok: bool = True,
                  scrub: list[tuple[str, str]] | None = None) -> int:
    """Summaries, tables, the targets check, JSON, PNGs, report.md and (maybe) RESULTS.md."""
    scrub = scrub or []
    tnames, skipped, skeys = meta["targets"], meta["skipped"], meta["scenarios"]
    avail = [t for t in tnames if t not in skipped]
    notes = meta["notes"]
    summary = report.summarize(runs, skeys, avail)
    fastws_note = skipped.get("fastws") if "fastws" in tnames else "fastws was not among --targets"
    trows = report.evaluate_targets(summary, avail)
    tables = report.markdown(summary, skeys, tnames, skipped, trows, fastws_note)
    if meta.get("micro"):
        from .micro import micro_table
        tables += "\n" + micro_table(meta["micro"])
    failed_runs = sum(1 for r in runs if not r["ok"])
    out.mkdir(parents=True, exist_ok=True)
    data = json.dumps({"meta": meta, "summary": summary, "targets_check": trows, "runs": runs}, indent=1)
    (out / "results.json").write_text(_scrub(data, scrub))
    info = meta["machine"]
    subtitle = (f"{info['cpu_model']}, {info['cores']} cores, kernel {info['kernel']}; "
                f"{meta['rounds']} round(s) × {meta['duration_s']:g} s; {meta['started_utc'][:10]}")
    pngs = []
    if plots_ok:
        try:
            from . import plots
            pngs = plots.write_plots(summary, skeys, avail, out, subtitle)
        except Exception as e:  # plots must never lose the measurements
            notes.append(f"plotting failed: {e!r}")
    (out / "report.md").write_text(_scrub(render_markdown(meta, tables, pngs, out, failed_runs, runs), scrub))
    if write_md:
        text = _scrub(render_markdown(meta, tables, pngs, HERE, failed_runs, runs), scrub)
        (HERE / "RESULTS.md").write_text(text + _kept_sections(HERE / "RESULTS.md"))
        log("wrote bench/RESULTS.md")
    log(f"wrote {out / 'results.json'}, {out / 'report.md'}" + "".join(f", {p.name}" for p in pngs))
    print()
    print(tables)
    if failed_runs:
        log(f"{failed_runs} run(s) FAILED (errors or a crash); they are marked in the tables and not averaged in")
    return failed_runs


def render_markdown(meta: dict, tables: str, pngs: list[Path], base: Path, failed: int,
                    runs: list[dict] | None = None) -> str:
    m = meta["machine"]
    bgs = sorted(r["background_cores"] for r in (runs or []) if r.get("background_cores") is not None)
    lines = [
        "# fastws benchmark results",
        "",
        "fastws against nginx, HAProxy (with and without splice) and no proxy at all, measured in one run",
        "on one machine, scenario by scenario, every target once per round in rotating order (A B A B).",
        "Values are the median over rounds with min–max in brackets; `vs nginx` is the median's ratio to",
        "nginx's. CPU is the proxy's own utime + stime from /proc, summed over all its processes, per",
        "unit of work. A run with any error (a wrong echo byte, a refused or dropped connection) is",
        "marked failed and left out of the medians. See bench/README.md for what each scenario does.",
        "",
        "## Run",
        "",
        f"- command: `{meta['command']}`",
        f"- date (UTC): {meta['started_utc']} to {meta['finished_utc']}",
        f"- machine: {m['cpu_model']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}, "
        f"open files hard limit {m['nofile_hard_limit']:,}",
        "- peers: " + "; ".join(f"{v}" for v in m["versions"].values()),
        f"- fastws: {meta.get('fastws') or 'not run'}"
        + (f"; repository at commit {meta['git_commit']}" if meta.get("git_commit") else "")
        + (f" at the start and {meta['git_commit_at_end']} at the end (the checkout changed during the run)"
           if meta.get("git_commit_at_end") and meta.get("git_commit_at_end") != meta.get("git_commit") else ""),
        f"- {meta['rounds']} round(s), {meta['warmup_s']:g} s warm-up + {meta['duration_s']:g} s measured per run"
        + (" (--quick smoke run)" if meta["quick"] else ""),
        f"- pinning: {meta['pinning']}",
    ]
    if bgs:
        med = bgs[len(bgs) // 2]
        busy = med >= 0.2
        lines.append(f"- CPU used outside the bench during the measurements (`other CPU` in the tables): median "
                     f"{med:.2f} cores, max {bgs[-1]:.2f}" +
                     (": **the machine was busy with other work during this run**, so throughput and latency "
                      "moved with it; proxy CPU per unit of work is the steadier comparison" if busy else ""))
    if failed:
        lines.append(f"- **{failed} run(s) failed** and are not averaged in (see each table)")
    for n in meta["notes"]:
        if n != meta["pinning"]:
            lines.append(f"- note: {n}")
    lines += ["", "## Results", "", tables]
    if pngs:
        lines += ["## Plots", ""]
        for p in pngs:
            try:
                rel = os.path.relpath(p, base)
            except ValueError:
                rel = p.name
            lines.append(f"![{p.stem}]({rel})")
        lines.append("")
    return "\n".join(lines)


KEPT_MARK = "<!-- kept: written by python -m bench.tls, kept by full runs -->"


def _kept_sections(path: Path) -> str:
    """The part of RESULTS.md below KEPT_MARK (the TLS figures), which a full run keeps."""
    try:
        old = path.read_text()
    except OSError:
        return ""
    at = old.find(KEPT_MARK)
    return "\n" + old[at:] if at >= 0 else ""
