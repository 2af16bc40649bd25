"""Where a proxy's CPU goes, per handshake, per request and per message: fastws beside nginx.

    python -m bench.profile [--targets fastws,nginx] [--kinds handshake,http,echo,chat]
        [--seconds 8]

For each target and each kind of work (the loads of python -m bench.syscalls, run at full
speed): starts the target as `python -m bench` does (proxy pinned to its own CPU), runs an
untraced warm-up, then samples that CPU with `perf record -g -e cpu-clock` while the load runs,
and reads the proxy's own CPU time (utime + stime from /proc) over the same window. Each sample
of the proxy's processes is put under the system call it was taken in (the outermost
`__x64_sys_*` frame of its kernel call chain: the work the kernel does for that call, the
loopback delivery to the peer included), or under user space, or interrupts; a category's
share of the samples times the CPU per unit of work is its cost per unit.

Prints a Markdown table per kind of work, the targets side by side, in µs per unit, and each
target's busiest functions in user space. Needs perf (Debian: linux-perf) and a kernel that
lets root sample (cpu-clock is a software event: it works in most VMs). Loopback only; every
run is bounded in count and time.
"""
from __future__ import annotations

import argparse
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from . import procs
from .runner import Runner, _affinity
from .scenarios import BY_KEY
from .syscalls import KINDS, TARGETS, log, pick, prepare, run_wsload

# a system call's own frame, as the kernel names it (__x64_sys_sendto; where the dispatcher
# inlines the wrapper, __do_sys_io_uring_enter, __sys_sendmsg, ksys_read, do_writev...)
SYSCALL = re.compile(r"^(?:__x64_sys|__do_sys|__se_sys|__ia32_sys|__sys|ksys)_(\w+)$")
SYSCALL_DO = {"do_writev": "writev", "do_readv": "readv", "do_epoll_wait": "epoll_wait",
              "do_epoll_ctl": "epoll_ctl", "do_epoll_pwait": "epoll_pwait",
              "__do_splice": "splice", "do_splice": "splice", "do_tee": "tee"}
USER = "user space"
IRQ = "interrupts"
OTHER = "kernel, other"


def parse_script(text: str, pids: set[int]) -> list[list[str]]:
    """The call chains (leaf first, function names) of the samples of `pids` in the output of
    `perf script -F pid,ip,sym`: a header line with the pid (right-aligned), then one frame a
    line, each after a tab."""
    chains: list[list[str]] = []
    keep = False
    for line in text.splitlines():
        s = line.strip()
        if not s:
            keep = False
            continue
        if not line.startswith("\t"):                 # a sample's header: its pid
            try:
                keep = int(s.split()[0]) in pids
            except ValueError:
                keep = False
            if keep:
                chains.append([])
            continue
        if keep:
            parts = s.split(None, 1)
            chains[-1].append((parts[1] if len(parts) > 1 else parts[0]).split("+0x")[0])
    return [c for c in chains if c]


def category(chain: list[str]) -> str:
    """The system call a sample was taken in (its outermost syscall frame), else user space,
    interrupts, or other kernel work (kernel threads' work done in the proxy's name)."""
    for name in reversed(chain):
        m = SYSCALL.match(name)
        if m:
            return m.group(1)
        if name in SYSCALL_DO:
            return SYSCALL_DO[name]
    if any(n.startswith(("asm_sysvec", "asm_common_interrupt", "irq_")) for n in chain):
        return IRQ
    if any(n.startswith(("entry_SYSCALL", "do_syscall_64")) for n in chain):
        return OTHER
    if any(n.startswith(("ret_from_fork", "kthread")) for n in chain):
        return OTHER
    return USER


def shares(chains: list[list[str]]) -> tuple[dict[str, float], dict[str, float]]:
    """Each category's share of the samples, and the user-space leaf functions' shares."""
    n = len(chains) or 1
    cats = Counter(category(c) for c in chains)
    users = Counter(c[0] for c in chains if category(c) == USER)
    return ({k: v / n for k, v in cats.items()}, {k: v / n for k, v in users.items()})


def perf_works(perf: str) -> str | None:
    """None if perf can sample here, else why not."""
    r = subprocess.run([perf, "record", "-q", "-e", "cpu-clock", "-o", "/dev/null", "true"],
                       capture_output=True, text=True, timeout=60)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["perf failed"])[-1]


def measure(t, kind: str, runner: Runner, exes: dict, args, workdir: Path, perf: str) -> dict:
    mode, unit, scen = KINDS[kind]
    conns = {"handshake": BY_KEY["handshake"].conns, "http": BY_KEY["http"].conns,
             "echo": BY_KEY["echo-64"].conns, "chat": args.conns_chat}[kind]
    rec: dict = {"target": t.name, "kind": kind, "unit": unit, "ok": False, "error": None}
    err = t.start(workdir, runner.backend_addr, runner.proxy_cpus)
    if err:
        rec["error"] = err
        return rec
    rec_proc = None
    data = workdir / f"perf-{kind}.data"
    cpus = ",".join(str(c) for c in sorted(runner.proxy_cpus)) if runner.proxy_cpus else None
    window: dict = {}
    try:
        host, port = t.address(runner.backend_addr)
        warm = {"handshake": 500, "http": 5000}.get(kind, 1)
        res, err, _ = run_wsload(exes["wsload"], mode, host, port, conns, warm, 60, runner.load_cpus)
        if err:
            rec["error"] = f"warm-up: {err}"
            return rec
        pids = t.pids()

        def start() -> str | None:
            nonlocal rec_proc
            cmd = [perf, "record", "-q", "-g", "-e", "cpu-clock", "-o", str(data)]
            cmd += ["-C", cpus] if cpus else ["-p", ",".join(map(str, pids))]
            rec_proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True,
                                        preexec_fn=_affinity(runner.load_cpus))
            time.sleep(0.3)                      # (perf opens its events before the load)
            if rec_proc.poll() is not None:
                return f"perf record: {rec_proc.stderr.read().strip()[-300:]}"  # type: ignore[union-attr]
            window["cpu0"] = procs.cpu_seconds(pids)
            return None

        def stop() -> None:
            if "cpu1" not in window:
                window["cpu1"] = procs.cpu_seconds(pids)
            if rec_proc is not None and rec_proc.poll() is None:
                rec_proc.send_signal(signal.SIGINT)
                rec_proc.wait(timeout=60)

        if mode in ("echo", "chat"):
            res, err, shown = run_wsload(exes["wsload"], mode, host, port, conns, args.seconds,
                                         args.limit, runner.load_cpus, start, stop)
            n = res["count"] if res else 0
        else:
            err = start()
            if err:
                rec["error"] = err
                return rec
            count = {"handshake": args.handshakes, "http": args.requests}[kind]
            res, err, shown = run_wsload(exes["wsload"], mode, host, port, conns, count, args.limit,
                                         runner.load_cpus)
            stop()
            n = res["total_count"] if res else 0
        rec["command"] = shown
        if err:
            rec["error"] = err
            return rec
        if n <= 0 or "cpu0" not in window:
            rec["error"] = "no work counted in the sampled window"
            return rec
        script = subprocess.run([perf, "script", "-i", str(data), "-F", "pid,ip,sym"],
                                capture_output=True, text=True, timeout=600)
        chains = parse_script(script.stdout, set(pids))     # (perf's pid: the process, all its threads)
        if not chains:
            rec["error"] = "perf recorded no sample of the proxy"
            return rec
        rec["units"] = n
        rec["samples"] = len(chains)
        rec["cpu_us"] = (window["cpu1"] - window["cpu0"]) / n * 1e6
        rec["shares"], rec["user"] = shares(chains)
        rec["ok"] = True
        return rec
    finally:
        if rec_proc is not None and rec_proc.poll() is None:
            rec_proc.kill()
            rec_proc.wait()
        if not t.alive() and not rec.get("error"):
            rec["error"] = f"{t.label} died during the run: {t.log_tail()}"
            rec["ok"] = False
        t.stop()


def table(kind: str, recs: list[dict], top: int) -> str:
    ok = [r for r in recs if r["ok"]]
    unit = KINDS[kind][1]
    lines = [f"### Proxy CPU per {unit}, by where it goes ({kind})", ""]
    if not ok:
        return "\n".join(lines + ["no target measured: " + "; ".join(
            f"{r['target']}: {r['error']}" for r in recs)]) + "\n"
    cats = sorted({c for r in ok for c in r["shares"]},
                  key=lambda c: -max(r["shares"].get(c, 0) * r["cpu_us"] for r in ok))
    lines.append("| µs per " + unit + " | " + " | ".join(r["target"] for r in ok) + " |")
    lines.append("|---|" + "---:|" * len(ok))
    lines.append("| **all (utime + stime)** | " + " | ".join(f"**{r['cpu_us']:.2f}**" for r in ok) + " |")
    for c in cats[:top]:
        name = c if c in (USER, IRQ, OTHER) else f"`{c}`"
        lines.append(f"| {name} | " + " | ".join(
            f"{r['shares'].get(c, 0) * r['cpu_us']:.2f}" for r in ok) + " |")
    lines.append("| samples | " + " | ".join(f"{r['samples']:,}" for r in ok) + " |")
    lines.append("")
    for r in ok:
        busiest = sorted(r["user"].items(), key=lambda kv: -kv[1])[:5]
        lines.append(f"- {r['target']}, busiest in user space: " + ", ".join(
            f"`{k}` {v * r['cpu_us']:.2f}" for k, v in busiest))
    for r in recs:
        if not r["ok"]:
            lines.append(f"- {r['target']}: FAILED: {r['error']}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="fastws,nginx",
                    help=f"comma list from: {','.join(TARGETS)} (default fastws,nginx)")
    ap.add_argument("--kinds", default="handshake,http,echo,chat",
                    help="comma list from: handshake,http,echo,chat")
    ap.add_argument("--seconds", type=float, default=8, help="seconds of echoes sampled (echo, chat)")
    ap.add_argument("--handshakes", type=int, default=60000, help="handshakes sampled (default 60000)")
    ap.add_argument("--requests", type=int, default=500000, help="GETs sampled (default 500000)")
    ap.add_argument("--conns-chat", type=int, default=BY_KEY["chat-5k"].conns,
                    help=f"chat connections (default {BY_KEY['chat-5k'].conns}, as the bench)")
    ap.add_argument("--top", type=int, default=12, help="categories listed (default 12)")
    ap.add_argument("--limit", type=float, default=120, help="seconds a run may take at most (default 120)")
    ap.add_argument("--out", metavar="FILE", help="also write the Markdown to FILE")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the configs, logs and perf data")
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    picked = pick(args)
    if picked is None:
        return 2
    tnames, kinds = picked
    if not (0 < args.handshakes <= 1_000_000 and 0 < args.requests <= 10_000_000
            and 0 < args.seconds <= 60 and 0 < args.limit <= 600):
        print("--handshakes, --requests, --seconds and --limit must be positive and bounded",
              file=sys.stderr)
        return 2
    perf = shutil.which("perf")
    if not perf:
        print("perf is not installed (Debian: apt-get install -y linux-perf)", file=sys.stderr)
        return 2
    why = perf_works(perf)
    if why:
        print(f"perf cannot sample here: {why}", file=sys.stderr)
        return 2
    exes, _, targets, runner, pin_note = prepare(tnames, kinds, args, {})
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    try:
        runner.start_backend()
        for kind in kinds:
            for t in targets:
                log(f"{kind}: {t.label} ...")
                rec = measure(t, kind, runner, exes, args, runner.tmp / f"{kind}-{t.name}", perf)
                results[kind].append(rec)
                log(f"{kind}: {t.label}: " + (f"{rec['cpu_us']:.2f} µs per {rec['unit']}, "
                                              f"{rec['samples']:,} samples" if rec["ok"]
                                              else f"FAILED: {rec['error']}"))
    finally:
        if args.keep_tmp:
            log(f"configs, logs and perf data kept in {runner.tmp}")
        runner.cleanup()
    command = "python -m bench.profile" + ("" if not argv else " " + " ".join(shlex.quote(a) for a in argv))
    parts = ["## Where the proxy's CPU goes", "", f"- command: `{command}`",
             f"- {pin_note}; `perf record -g -e cpu-clock` on the proxy's CPU during the load, "
             "the proxy's samples put under the system call they were taken in; µs per unit is "
             "that share of the proxy's utime + stime per unit over the same window", ""]
    for kind in kinds:
        parts.append(table(kind, results[kind], args.top))
    md = "\n".join(parts)
    print(md)
    if args.out:
        Path(args.out).write_text(md + "\n")
    return 0 if all(r["ok"] for rs in results.values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
