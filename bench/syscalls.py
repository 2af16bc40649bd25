"""System calls per handshake, per request and per message: fastws beside nginx and HAProxy.

    python -m bench.syscalls [--targets fastws,nginx,haproxy] [--kinds handshake,http,echo,chat]
        [--handshakes 2000] [--requests 10000] [--seconds 5]

For each target and each kind of work, one after the other: starts the target as `python -m
bench` does (same generated config, proxy pinned to its own CPU, in front of the bench's C
backend), runs a short untraced warm-up, attaches `strace -c -f` to the proxy's processes by
PID (all of them: master and workers, every thread), runs a fixed number of handshakes
(wsload --mode handshake --count N: connect, upgrade, one 64 B echo, close) or of small
keep-alive GETs (wsload --mode http --count N), or --seconds of 64 B echoes (the echo-64
ping-pong, and the chat-5k scenario's 5,000 connections with a message each a second),
detaches strace (SIGINT), and divides each system call's count by the work wsload reports on
its RESULT line. strace slows the proxy
down many times over: the counts are the figure, not the time.

Prints a Markdown table per kind of work, the targets side by side: calls per unit in total
and for the busiest system calls, failed calls (mostly EAGAIN) in brackets. Loopback only;
every run is bounded in count and time.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import build, deps
from .runner import SRC_ADDRS, Runner, _affinity
from .scenarios import BY_KEY
from .targets import LABELS, make_targets

KINDS = {
    # kind: (wsload mode, unit, scenario it mirrors)
    "handshake": ("handshake", "handshake", "handshake"),
    "http": ("http", "request", "http"),
    "echo": ("echo", "message", "echo-64"),
    "chat": ("chat", "message", "chat-5k"),
}
TARGETS = ("fastws", "fastws-epoll", "nginx", "haproxy", "haproxy-splice")


def log(msg: str) -> None:
    print(f"[syscalls {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- strace's summary ----------------------------------------------------------

class ParseError(ValueError):
    pass


DASHES = re.compile(r"-+( +-+)+ *")


def parse_summary(text: str) -> dict[str, dict[str, int]]:
    """strace -c's table -> {syscall: {"calls": n, "errors": n}}, plus "total".

    Reads both the default layout (name last) and -U name,calls,errors (name first). A row
    has one cell per header column, except that an empty errors cell leaves a row one
    short. Several tables (one per personality) are added up; each total row is checked
    against the sum of its table's rows."""
    lines = text.splitlines()
    out: dict[str, dict[str, int]] = {}
    totals = {"calls": 0, "errors": 0}
    i, tables = 0, 0
    while i < len(lines):
        if not (i + 1 < len(lines) and DASHES.fullmatch(lines[i + 1]) and "calls" in lines[i].split()):
            i += 1
            continue
        header = lines[i].replace("% time", "%time").split()
        if "calls" not in header or "syscall" not in header:
            raise ParseError(f"unexpected strace summary header: {lines[i]!r}")
        tables += 1
        i += 2
        table = {"calls": 0, "errors": 0}

        def cells(row: str) -> dict[str, str]:
            tok = row.split()
            cols = header
            if len(tok) == len(header) - 1 and "errors" in header:
                cols = [c for c in header if c != "errors"]
            if len(tok) != len(cols):
                raise ParseError(f"unreadable strace summary row: {row!r}")
            return dict(zip(cols, tok))

        while i < len(lines) and not DASHES.fullmatch(lines[i]):
            row = lines[i]
            i += 1
            if not row.strip():
                continue
            c = cells(row)
            name = c["syscall"]
            try:
                calls, errors = int(c["calls"]), int(c.get("errors") or 0)
            except ValueError:
                raise ParseError(f"unreadable strace summary row: {row!r}") from None
            if not re.fullmatch(r"[A-Za-z_0-9?]+", name) or name == "total":
                raise ParseError(f"unreadable syscall name in strace summary row: {row!r}")
            e = out.setdefault(name, {"calls": 0, "errors": 0})
            e["calls"] += calls
            e["errors"] += errors
            table["calls"] += calls
            table["errors"] += errors
        i += 1   # the closing dashes; the total row follows
        if i < len(lines) and "total" in lines[i].split():
            c = cells(lines[i])
            if int(c["calls"]) != table["calls"] or int(c.get("errors") or 0) != table["errors"]:
                raise ParseError(f"strace's total row ({lines[i].strip()!r}) is not the sum of its rows "
                                 f"({table['calls']} calls, {table['errors']} errors)")
            i += 1
        else:
            raise ParseError("strace summary without its total row")
        totals["calls"] += table["calls"]
        totals["errors"] += table["errors"]
    if not tables:
        raise ParseError("no strace summary table found" + (f": {text.strip()[-300:]!r}" if text.strip() else
                                                           " (empty output)"))
    out["total"] = totals
    return out


# -- tracing -------------------------------------------------------------------

def _tasks(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def _tracer(tid: int) -> int | None:
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def wait_attached(strace: subprocess.Popen, pids: list[int], timeout: float = 15.0) -> str | None:
    """Every thread of every pid traced by this strace? Returns an error or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if strace.poll() is not None:
            return f"strace exited ({strace.returncode}) before attaching"
        tids = [t for p in pids for t in _tasks(p)]
        if tids and all(_tracer(t) == strace.pid for t in tids):
            return None
        time.sleep(0.05)
    return f"strace did not attach to every thread of {pids} within {timeout:g} s"


def run_wsload(exe: Path, mode: str, host: str, port: int, conns: int, count: float, limit: float,
               cpus, attach=None, detach=None) -> tuple[dict | None, str | None, str]:
    """wsload with a fixed --count (or, for echo and chat, --duration `count`); returns (RESULT,
    error, command).  With `attach`, wsload waits once its connections are set up ("MARK
    open") until attach() has run, and detach() runs at "MARK end" (the closes after it are not
    counted: the RESULT's "count", the messages of the measured window, is the unit then)."""
    cmd = [str(exe), "--mode", mode, "--host", host, "--port", str(port), "--conns", str(conns),
           "--warmup", "0", "--timeout", "60"]
    if mode in ("echo", "chat"):
        # messages are counted over a time (count is in seconds here)
        cmd += ["--size", "64", "--duration", f"{count:g}"]
    else:
        cmd += ["--count", str(count), "--duration", f"{limit:g}"]
    if mode == "handshake":
        cmd += ["--size", "64", "--src", SRC_ADDRS]
    if mode == "chat":
        cmd += ["--src", SRC_ADDRS, "--inflight", "256"]
    if attach is not None:
        cmd += ["--wait-go"]
    shown = " ".join(["wsload", *cmd[1:]])
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=_affinity(cpus))
    timer = threading.Timer(limit + 120, p.kill)
    timer.start()
    lines = []
    try:
        assert p.stdout is not None and p.stdin is not None
        for line in p.stdout:
            lines.append(line)
            if line.startswith("MARK open") and attach is not None:
                err = attach()
                if err:
                    p.kill()
                    return None, err, shown
                p.stdin.write("go\n")
                p.stdin.flush()
            elif line.startswith("MARK end") and detach is not None:
                detach()
        p.wait()
    finally:
        timer.cancel()
    if p.returncode == -9:
        return None, f"wsload exceeded {limit + 120:g} s and was stopped", shown

    class R:
        stdout = "".join(lines)
        stderr = p.stderr.read() if p.stderr else ""
        returncode = p.returncode
    r = R()
    res = None
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            try:
                res = json.loads(line[7:])
            except ValueError:
                return None, f"unreadable RESULT line: {line[:200]}", shown
    if res is None:
        return None, f"wsload printed no RESULT (exit {r.returncode}): {r.stderr.strip()[-300:]}", shown
    if res["errors"]:
        return res, f"{res['errors']} errors: " + "; ".join(res.get("error_samples", [])[:3]), shown
    if r.returncode != 0:
        return res, f"wsload exited {r.returncode}", shown
    return res, None, shown


def strace_columns(strace_exe: str) -> list[str]:
    """["-U", "name,calls,errors"] where this strace has -U (5.x and later), else [] (its
    default layout, which parse_summary reads too)."""
    try:
        r = subprocess.run([strace_exe, "-c", "-U", "name,calls,errors", "-o", os.devnull, "true"],
                           capture_output=True, timeout=20)
        return ["-U", "name,calls,errors"] if r.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired):
        return []


def measure(t, kind: str, runner: Runner, exes: dict, args, workdir: Path, strace_exe: str,
            columns: list[str]) -> dict:
    mode, unit, _ = KINDS[kind]
    count = {"handshake": args.handshakes, "http": args.requests}.get(kind, args.seconds)
    conns = {"handshake": args.conns_handshake, "http": args.conns_http, "echo": BY_KEY["echo-64"].conns,
             "chat": args.conns_chat}[kind]
    rec: dict = {"target": t.name, "kind": kind, "unit": unit, "ok": False, "error": None}
    err = t.start(workdir, runner.backend_addr, runner.proxy_cpus)
    if err:
        rec["error"] = err
        return rec
    strace = None
    try:
        host, port = t.address(runner.backend_addr)
        if args.warmup_count:
            warm = args.warmup_count if kind in ("handshake", "http") else 1   # (echoes: 1 s)
            res, err, _ = run_wsload(exes["wsload"], mode, host, port, conns, warm, 60, runner.load_cpus)
            if err:
                rec["error"] = f"warm-up: {err}"
                return rec
        pids = t.pids()
        rec["pids"] = len(pids)
        out = workdir / f"strace-{kind}.txt"
        cmd = [strace_exe, "-c", "-f", *columns, "-S", "calls", "-o", str(out)]
        for p in pids:
            cmd += ["-p", str(p)]
        rec["strace"] = " ".join(["strace", *cmd[1:]]).replace(str(workdir), "$WORKDIR")

        def stop_tracing() -> None:
            if strace is not None and strace.poll() is None:
                strace.send_signal(signal.SIGINT)   # detach: strace writes its summary and exits
                strace.wait(timeout=60)

        def attach() -> str | None:
            nonlocal strace
            errf = open(workdir / f"strace-{kind}.stderr", "w")
            strace = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errf,
                                      preexec_fn=_affinity(runner.load_cpus))
            errf.close()
            err = wait_attached(strace, pids)
            return err + ": " + (workdir / f"strace-{kind}.stderr").read_text()[-300:] if err else None
        if mode in ("echo", "chat"):
            # the connections are set up untraced: strace attaches once wsload says so
            res, err, shown = run_wsload(exes["wsload"], mode, host, port, conns, count, args.limit,
                                         runner.load_cpus, attach, stop_tracing)
        else:
            err = attach()
            if err:
                rec["error"] = err
                return rec
            res, err, shown = run_wsload(exes["wsload"], mode, host, port, conns, count, args.limit,
                                         runner.load_cpus)
        rec["command"] = shown
        if strace is None:
            rec["error"] = err or "strace never attached"
            return rec
        if strace.poll() is None:
            time.sleep(0.3)   # let the proxy finish the closes the load generator just made
            strace.send_signal(signal.SIGINT)   # detach: strace writes its summary and exits
        try:
            strace.wait(timeout=60)
        except subprocess.TimeoutExpired:
            strace.kill()
            strace.wait()
            rec["error"] = "strace did not detach within 60 s"
            return rec
        if err:
            rec["error"] = err
            return rec
        try:
            counts = parse_summary(out.read_text())
        except (OSError, ParseError) as e:
            rec["error"] = f"strace summary: {e}"
            return rec
        n = res["count"] if mode in ("echo", "chat") else res["total_count"]
        if n <= 0:
            rec["error"] = "wsload counted no work"
            return rec
        rec["units"] = n
        rec["counts"] = counts
        rec["per_unit"] = {k: {"calls": v["calls"] / n, "errors": v["errors"] / n} for k, v in counts.items()}
        if n < count:
            rec["note"] = f"{n} of {count} done in the time limit"
        rec["ok"] = True
        return rec
    finally:
        if strace is not None and strace.poll() is None:
            strace.send_signal(signal.SIGINT)
            try:
                strace.wait(timeout=30)
            except subprocess.TimeoutExpired:
                strace.kill()
                strace.wait()
        if not t.alive() and not rec.get("error"):
            rec["error"] = f"{t.label} died during the run: {t.log_tail()}"
            rec["ok"] = False
        t.stop()


# -- the tables ----------------------------------------------------------------

def _cell(v: dict | None) -> str:
    if v is None:
        return "—"
    calls, errors = v["calls"], v["errors"]
    s = _n(calls)
    if errors:
        s += f" ({_n(errors)} failed)"
    return s


def _n(x: float) -> str:
    if x == 0:
        return "0"
    if x < 0.005:
        return "<0.01"
    return f"{x:.2f}" if x < 100 else f"{x:,.0f}"


def table(kind: str, recs: list[dict], top: int) -> str:
    _, unit, sk = KINDS[kind]
    sc = BY_KEY[sk]
    ok = [r for r in recs if r["ok"]]
    lines = [f"### System calls per {unit} ({kind})", ""]
    if not recs:
        return "\n".join(lines + ["_not run_", ""])
    head = ["syscall"] + [LABELS[r["target"]] for r in recs]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * len(recs)) + "|")
    # the busiest calls: each target's top ones, ordered by the most any target makes
    names: set[str] = set()
    for r in ok:
        ranked = sorted((k for k in r["per_unit"] if k != "total"), key=lambda k: -r["per_unit"][k]["calls"])
        names.update(ranked[:top])
    order = sorted(names, key=lambda k: (-max(r["per_unit"].get(k, {"calls": 0})["calls"] for r in ok), k))
    row = ["**total**"]
    for r in recs:
        row.append(f"**{_cell(r['per_unit']['total'])}**" if r["ok"] else "**FAILED**")
    lines.append("| " + " | ".join(row) + " |")
    if ok and any(r["ok"] for r in recs):
        nginx = next((r for r in ok if r["target"] == "nginx"), None)
        if nginx:
            row = ["vs nginx"]
            for r in recs:
                row.append(f"{r['per_unit']['total']['calls'] / nginx['per_unit']['total']['calls']:.2f}x"
                           if r["ok"] and nginx["per_unit"]["total"]["calls"] else "—")
            lines.append("| " + " | ".join(row) + " |")
    for k in order:
        lines.append("| " + " | ".join([f"`{k}`"] + [_cell(r["per_unit"].get(k, {"calls": 0, "errors": 0}))
                                                      if r["ok"] else "—" for r in recs]) + " |")
    rest = ["other calls"]
    for r in recs:
        if not r["ok"]:
            rest.append("—")
            continue
        o = sum(v["calls"] for k, v in r["per_unit"].items() if k != "total" and k not in names)
        rest.append(_n(o))
    lines.append("| " + " | ".join(rest) + " |")
    row = [f"{unit}s counted"] + [f"{r['units']:,}" if r["ok"] else "—" for r in recs]
    lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append(f"_{sc.what[0].upper() + sc.what[1:]}; calls per {unit}, summed over the proxy's processes "
                 "and threads; (n failed): the calls among them that returned an error (EAGAIN, EINPROGRESS, "
                 "ENOENT...)._")
    cmds = sorted({re.sub(r"--port [0-9]+", "--port PORT", r["command"]) for r in recs if r.get("command")})
    for c in cmds:
        lines.append("")
        lines.append(f"load: `{c}`")
    for r in recs:
        if not r["ok"]:
            lines.append(f"- {LABELS[r['target']]} FAILED: {r.get('error')}")
        elif r.get("note"):
            lines.append(f"- {LABELS[r['target']]}: {r['note']}")
    lines.append("")
    return "\n".join(lines)


def pick(args) -> tuple[list[str], list[str]] | None:
    """args.targets and args.kinds as lists (None, said on stderr, if a name is unknown)."""
    tnames = [t for t in (x.strip() for x in args.targets.split(",")) if t]
    kinds = [k for k in (x.strip() for x in args.kinds.split(",")) if k]
    bad = [t for t in tnames if t not in TARGETS] + [k for k in kinds if k not in KINDS]
    if bad or not tnames or not kinds:
        print(f"unknown or no targets/kinds: {bad}; targets: {','.join(TARGETS)}; "
              f"kinds: {','.join(KINDS)}", file=sys.stderr)
        return None
    return tnames, kinds


def prepare(tnames: list[str], kinds: list[str], args, options: dict[str, str]):
    """As python -m bench sets up: this process on the load generator's CPUs, the peers
    installed, the C tools built, the targets made (those that cannot run said and left out),
    and a Runner for the backend.  (exes, targets, live targets, runner, pinning note)."""
    from .cli import pinning
    load_cpus, proxy_cpus, pin_note = pinning()
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)
    if any(t in tnames for t in ("nginx", "haproxy", "haproxy-splice")):
        for n in deps.ensure_debian_packages(log):
            log(n)
    exes = build.build_all(log)
    targets = make_targets(tnames, 0, None, "always", options)
    live = []
    for t in targets:
        if t.available:
            live.append(t)
        else:
            log(f"SKIP {t.label}: {t.note}")
    runner = Runner(exes, live, [BY_KEY[KINDS[k][2]] for k in kinds], rounds=1, duration=args.limit,
                    warmup=0, load_cpus=load_cpus, proxy_cpus=proxy_cpus, log=log,
                    keep_tmp=args.keep_tmp)
    return exes, targets, live, runner, pin_note


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.syscalls", description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="fastws,nginx,haproxy",
                    help=f"comma list from: {','.join(TARGETS)} (default fastws,nginx,haproxy)")
    ap.add_argument("--kinds", default="handshake,http,echo,chat",
                    help="comma list from: handshake,http,echo,chat")
    ap.add_argument("--seconds", type=float, default=5, help="seconds of echoes traced per target (echo, chat)")
    ap.add_argument("--conns-chat", type=int, default=1000,
                    help="chat connections (default 1000: a traced proxy cannot echo chat-5k's 5,000 a second)")
    ap.add_argument("--handshakes", type=int, default=2000, help="handshakes traced per target (default 2000)")
    ap.add_argument("--requests", type=int, default=10000, help="GETs traced per target (default 10000)")
    ap.add_argument("--conns-handshake", type=int, default=BY_KEY["handshake"].conns,
                    help=f"concurrent handshake loops (default {BY_KEY['handshake'].conns}, as the bench)")
    ap.add_argument("--conns-http", type=int, default=BY_KEY["http"].conns,
                    help=f"keep-alive connections (default {BY_KEY['http'].conns}, as the bench)")
    ap.add_argument("--warmup-count", type=int, default=200, help="untraced units before each traced run (default 200)")
    ap.add_argument("--top", type=int, default=12, help="system calls listed: each target's busiest N (default 12)")
    ap.add_argument("--limit", type=float, default=300, help="seconds a traced run may take at most (default 300)")
    ap.add_argument("--fastws-option", action="append", default=[], metavar="KEY=VALUE",
                    help="add a top-level line to the fastws config, as python -m bench does")
    ap.add_argument("--out", metavar="FILE", help="also write the Markdown to FILE")
    ap.add_argument("--json", metavar="FILE", help="write the raw counts to FILE")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the configs, logs and strace outputs")
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    picked = pick(args)
    if picked is None:
        return 2
    tnames, kinds = picked
    if not (0 < args.handshakes <= 1_000_000 and 0 < args.requests <= 10_000_000 and 0 < args.limit <= 3600
            and args.warmup_count >= 0):
        print("--handshakes, --requests and --limit must be positive and bounded", file=sys.stderr)
        return 2
    strace_exe = deps.ensure_strace(log)
    if not strace_exe:
        print("strace is not installed (apt-get install -y strace)", file=sys.stderr)
        return 2
    columns = strace_columns(strace_exe)
    exes, targets, live, runner, pin_note = prepare(
        tnames, kinds, args, dict(o.split("=", 1) for o in args.fastws_option if "=" in o))
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    interrupted = False

    def on_signal(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    try:
        runner.start_backend()
        for kind in kinds:
            for t in live:
                log(f"{kind}: {t.label} ...")
                rec = measure(t, kind, runner, exes, args, runner.tmp / f"{kind}-{t.name}", strace_exe, columns)
                results[kind].append(rec)
                if rec["ok"]:
                    log(f"{kind}: {t.label}: {rec['per_unit']['total']['calls']:.2f} calls per {rec['unit']} "
                        f"over {rec['units']:,} {rec['unit']}s")
                else:
                    log(f"{kind}: {t.label} FAILED: {rec['error']}")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: printing what was counted")
    finally:
        if args.keep_tmp:
            log(f"configs, logs and strace outputs kept in {runner.tmp}")
        runner.cleanup()
    command = "python -m bench.syscalls" + ("" if not argv else " " + " ".join(shlex.quote(a) for a in argv))
    parts = ["## System calls per handshake and per request", "",
             f"- command: `{command}`",
             f"- {pin_note}; `strace -c -f` attached by PID to every process and thread of the proxy "
             f"after {args.warmup_count} untraced units, detached after the load generator's last one",
             "- strace stops the proxy at every system call, so it runs many times slower than in the bench: "
             "the counts are the figure (waits such as `epoll_wait` return more events at once when the proxy "
             "is slow, so their count per unit is the least steady)"]
    skipped = [f"{t.label}: {t.note}" for t in targets if not t.available]
    if skipped:
        parts.append("- skipped: " + "; ".join(skipped))
    if interrupted:
        parts.append("- **interrupted**: partial results")
    parts.append("")
    for kind in kinds:
        parts.append(table(kind, results[kind], args.top))
    md = "\n".join(parts)
    print(md)
    if args.out:
        Path(args.out).write_text(md + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "pinning": pin_note, "results": results},
                                              indent=1))
    failed = any(not r["ok"] for rs in results.values() for r in rs)
    return 1 if failed or interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
