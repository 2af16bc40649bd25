"""Runs every (round, scenario, target) in A B A B order and records raw measurements."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from . import procs
from .scenarios import BURST_SETTLE_S, Scenario
from .targets import Target, free_port, wait_port

BACKEND_PORT = 19001
BURST_LIMIT_S = 120.0   # the burst's own bound: not finishing 10,000 heads in this is an error
SRC_ADDRS = ",".join(f"127.0.0.{i}" for i in range(2, 10))


def nofile_hard() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def idle_tunnels(sc: Scenario) -> int:
    """Tunnels to open for an idle scenario: a one-process proxy needs two fds per
    tunnel (client side + upstream side) plus a few of its own, all under the
    per-process open files hard limit."""
    cap = (nofile_hard() - 200) // 2
    return max(1, min(sc.conns, cap))


def _affinity(cpus):
    def fn():
        os.setsid()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
        if cpus:
            os.sched_setaffinity(0, cpus)
    return fn


class Runner:
    def __init__(self, exes: dict, targets: list[Target], scenarios: list[Scenario], *, rounds: int,
                 duration: float, warmup: float, load_cpus, proxy_cpus, log=print, keep_tmp=False):
        self.exes = exes
        self.targets = targets
        self.scenarios = scenarios
        self.rounds = rounds
        self.duration = duration
        self.warmup = warmup
        self.load_cpus = load_cpus
        self.proxy_cpus = proxy_cpus
        self.log = log
        self.tmp = Path(tempfile.mkdtemp(prefix="fastws-bench-"))
        self.keep_tmp = keep_tmp
        self.backend: subprocess.Popen | None = None
        self.backend_addr = ("127.0.0.1", BACKEND_PORT)  # the real port is picked at start
        self.runs: list[dict] = []

    # -- backend ---------------------------------------------------------------
    def start_backend(self) -> None:
        if self.backend is not None and self.backend.poll() is None:
            return
        self.backend_addr = ("127.0.0.1", free_port())
        logf = open(self.tmp / "wsbackend.log", "ab")
        max_s = int(self.rounds * len(self.scenarios) * len(self.targets) * (self.duration + self.warmup + 60) + 600)
        self.backend = subprocess.Popen(
            [str(self.exes["wsbackend"]), "-a", self.backend_addr[0], "-p", str(self.backend_addr[1]), "-t", str(max_s)],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, preexec_fn=_affinity(self.load_cpus))
        logf.close()
        if not wait_port(*self.backend_addr, 10.0, self.backend) or \
                not procs.owns_listener([self.backend.pid], self.backend_addr[1]):
            raise RuntimeError(f"the bench backend did not start on port {self.backend_addr[1]}: "
                               f"{(self.tmp / 'wsbackend.log').read_text()[-300:]}")

    def stop_backend(self) -> None:
        if self.backend is not None and self.backend.poll() is None:
            self.backend.send_signal(signal.SIGTERM)
            try:
                self.backend.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.backend.kill()
                self.backend.wait()
        self.backend = None

    def cleanup(self) -> None:
        for t in self.targets:
            t.stop()
        self.stop_backend()
        if not self.keep_tmp:
            import shutil
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- one measurement -------------------------------------------------------
    @staticmethod
    def applies(t: Target, sc: Scenario) -> bool:
        """The burst measures a proxy rejecting heads: without a proxy there is nothing to measure;
        a target made for some scenarios runs only those."""
        if t.only is not None and sc.key not in t.only:
            return False
        return t.is_proxy or not sc.burst

    def run_one(self, t: Target, sc: Scenario, rnd: int) -> dict:
        rec: dict = {"target": t.name, "scenario": sc.key, "round": rnd, "ok": False, "error": None}
        self.start_backend()
        workdir = self.tmp / f"r{rnd}-{sc.key}-{t.name}"
        workdir.mkdir(parents=True, exist_ok=True)
        if t.is_proxy:
            err = t.start(workdir, self.backend_addr, t.cpus or self.proxy_cpus)
            if err:
                rec["error"] = err
                return rec
        try:
            self._measure(t, sc, rnd, rec, workdir)
        finally:
            if t.is_proxy:
                if not t.alive():
                    rec["ok"] = False
                    rec["error"] = rec["error"] or f"{t.label} died during the run: {t.log_tail()}"
                t.stop()
        return rec

    def _measure(self, t: Target, sc: Scenario, rnd: int, rec: dict, workdir: Path) -> None:
        host, port = t.address(self.backend_addr)
        if not t.is_proxy and not procs.owns_listener([self.backend.pid], port):
            rec["error"] = f"port {port} is no longer the bench backend's: not measured"
            return
        conns = idle_tunnels(sc) if sc.idle else sc.conns
        timeout = 60.0 if sc.idle or sc.mode == "chat" else 20.0
        # the burst is a fixed count of connections, bounded by its own time limit
        duration = BURST_LIMIT_S if sc.burst else self.duration
        cmd = [str(self.exes["wsload"]), "--mode", sc.mode, "--host", host, "--port", str(port),
               "--conns", str(conns), "--duration", f"{duration:g}"]
        if not sc.burst:   # the burst has no warm-up: the fresh proxy is its "before"
            cmd += ["--warmup", str(self.warmup)]
        cmd += ["--timeout", f"{timeout:g}"]
        if sc.count:
            cmd += ["--count", str(sc.count)]
        if sc.size:
            cmd += ["--size", str(sc.size)]
        if sc.uses_src:
            cmd += ["--src", SRC_ADDRS]
        if sc.idle:
            cmd += ["--hold", "120", "--inflight", "256"]
        if sc.mode == "chat":
            cmd += ["--inflight", "256"]
        if sc.pace_mb and sc.mode == "send":
            cmd += ["--rate", f"{sc.pace_mb:g}"]
        elif sc.pace_mb:               # the backend paces each firehose (bench/wsbackend.c)
            cmd += ["--path", f"/firehose?rate={sc.pace_mb / conns:g}"]
        rec["conns"] = conns
        rec["command"] = " ".join(["wsload", *cmd[1:]])
        wall_limit = duration + self.warmup + timeout + 150
        pids0 = t.pids() if t.is_proxy else []
        if sc.burst and pids0:
            mem0 = self._steady_memory(t)
        else:
            mem0 = procs.memory_kb(pids0) if (sc.idle and pids0) else None
        cpu_open0 = procs.cpu_seconds(t.pids()) if t.is_proxy else None
        errf = open(workdir / "wsload.stderr", "w")
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errf, text=True,
                             preexec_fn=_affinity(self.load_cpus))
        errf.close()
        killed = {"flag": False}

        def watchdog():
            if p.poll() is None:
                killed["flag"] = True
                p.kill()
        timer = threading.Timer(wall_limit, watchdog)
        timer.start()
        res = None
        cpu_start = cpu_end = None
        bg: dict = {}
        load_cpu: dict = {}   # the load generator's own CPU: is it the bottleneck?

        def bench_cpu():
            # everything the bench itself runs: proxy, load generator, backend, this harness
            own = procs.cpu_seconds(t.pids() + [p.pid] + ([self.backend.pid] if self.backend else []))
            return own + sum(os.times()[:2]), procs.system_cpu(), time.monotonic()
        try:
            for line in p.stdout:
                if line.startswith("MARK start"):
                    cpu_start = procs.cpu_seconds(t.pids()) if t.is_proxy else None
                    bg["start"] = bench_cpu()
                    load_cpu["start"] = procs.cpu_seconds([p.pid])
                elif line.startswith("MARK end"):
                    cpu_end = procs.cpu_seconds(t.pids()) if t.is_proxy else None
                    bg["end"] = bench_cpu()
                    load_cpu["end"] = procs.cpu_seconds([p.pid])
                    if sc.burst and t.is_proxy:
                        # the last connection has closed: the proxy's memory now, then as it settles
                        rec["burst_end_mono"] = time.monotonic()
                        rec["mem_end_kb"] = procs.memory_kb(t.pids())
                elif line.startswith("READY"):
                    time.sleep(1.0)   # let the proxy settle before reading its memory
                    if t.is_proxy:
                        pids1 = t.pids()
                        rec["mem_after_kb"] = procs.memory_kb(pids1)
                        cpu_start, cpu_end = cpu_open0, procs.cpu_seconds(pids1)
                    try:
                        p.stdin.write("go\n")
                        p.stdin.flush()
                    except (BrokenPipeError, OSError):
                        pass
                elif line.startswith("RESULT "):
                    res = json.loads(line[7:])
            p.wait()
        finally:
            timer.cancel()
            if p.poll() is None:
                p.kill()
                p.wait()
        rec["returncode"] = p.returncode
        if sc.burst and "burst_end_mono" in rec:
            self._settle(t, rec)
        if killed["flag"]:
            rec["error"] = f"load generator exceeded its wall-clock limit ({wall_limit:.0f} s) and was stopped"
            return
        if res is None:
            rec["error"] = f"load generator printed no result (exit {p.returncode}): " + \
                (workdir / "wsload.stderr").read_text()[-300:]
            return
        rec["result"] = res
        if res["errors"]:
            rec["error"] = f"{res['errors']} errors: " + "; ".join(res.get("error_samples", [])[:3])
            return
        if p.returncode != 0:
            rec["error"] = f"load generator exited {p.returncode}"
            return
        # -- derived numbers ---------------------------------------------------
        if sc.mode in ("send", "recv"):
            rec["throughput"] = res["mb_per_s"]
            units = res["bytes"] / 1e6
            if sc.pace_mb and res["mb_per_s"] > 1.05 * sc.pace_mb:
                rec["error"] = (f"{res['mb_per_s']:,.0f} MB/s in a run paced at {sc.pace_mb:,.0f}: "
                                f"the pacing did not hold")
                return
        elif sc.idle:
            rec["throughput"] = res["opened"]
            units = res["opened"]
        else:
            rec["throughput"] = res["rate"]
            units = res["count"]
        rec["units"] = units
        if "start" in bg and "end" in bg:
            (own0, sys0, w0), (own1, sys1, w1) = bg["start"], bg["end"]
            wall = max(w1 - w0, 1e-9)
            # CPU used on this machine by anything but the bench during the window, in cores
            rec["background_cores"] = max(0.0, ((sys1["busy"] - sys0["busy"]) - (own1 - own0)) / wall)
            rec["steal_cores"] = (sys1["steal"] - sys0["steal"]) / wall
        if "start" in bg and "end" in bg and "start" in load_cpu and "end" in load_cpu:
            wall = max(bg["end"][2] - bg["start"][2], 1e-9)
            # cores busy during the window: the load generator near 1.0 with the proxy
            # below it would mean the load generator, not the proxy, set the pace
            rec["loadgen_cores"] = (load_cpu["end"] - load_cpu["start"]) / wall
            if t.is_proxy and cpu_start is not None and cpu_end is not None:
                rec["proxy_cores"] = (cpu_end - cpu_start) / wall
        if sc.latency:
            rec["lat_us"] = res["lat_us"]
        if t.is_proxy and cpu_start is not None and cpu_end is not None and units > 0:
            rec["cpu_s"] = cpu_end - cpu_start
            rec["cpu_per_unit"] = (cpu_end - cpu_start) / units * sc.cpu_scale
        if sc.idle and mem0 is not None and "mem_after_kb" in rec and res["opened"] > 0:
            rec["mem_before_kb"] = mem0
            n = res["opened"]
            rec["pss_per_tunnel_b"] = (rec["mem_after_kb"]["pss_kb"] - mem0["pss_kb"]) * 1024 / n
            rec["rss_per_tunnel_b"] = (rec["mem_after_kb"]["rss_kb"] - mem0["rss_kb"]) * 1024 / n
        if sc.burst:
            rec["statuses"] = res.get("statuses", {})
            rec["resets"] = res.get("resets", 0)
            if mem0 is None or "mem_end_kb" not in rec or "mem_settled_kb" not in rec:
                rec["error"] = "the proxy's memory could not be read before, at the end of, or after the burst"
                return
            rec["mem_before_kb"] = mem0
            for k in ("pss", "rss"):
                b = mem0[f"{k}_kb"]
                rec[f"{k}_before_mb"] = b * 1024 / 1e6
                rec[f"{k}_end_mb"] = rec["mem_end_kb"][f"{k}_kb"] * 1024 / 1e6
                rec[f"{k}_settled_mb"] = rec["mem_settled_kb"][f"{k}_kb"] * 1024 / 1e6
                rec[f"{k}_growth_mb"] = (rec["mem_settled_kb"][f"{k}_kb"] - b) * 1024 / 1e6
            if res["count"] < sc.count:
                rec["error"] = f"only {res['count']} of {sc.count} heads answered"
                return
        if sc.idle and res["opened"] < conns:
            rec["error"] = f"only {res['opened']} of {conns} tunnels opened"
            return
        rec["ok"] = True

    @staticmethod
    def _steady_memory(t: Target, tolerance_kb: int = 64, limit_s: float = 5.0) -> dict | None:
        """The proxy's memory once it has stopped moving after its start (two readings 0.3 s
        apart within tolerance_kb of each other, for at most limit_s): the burst's "before"."""
        deadline = time.monotonic() + limit_s
        last = procs.memory_kb(t.pids())
        while time.monotonic() < deadline:
            time.sleep(0.3)
            pids = t.pids()
            if not pids:
                return None
            m = procs.memory_kb(pids)
            if abs(m["pss_kb"] - last["pss_kb"]) <= tolerance_kb and abs(m["rss_kb"] - last["rss_kb"]) <= tolerance_kb:
                return m
            last = m
        return last

    def _settle(self, t: Target, rec: dict) -> None:
        """After a burst: read the proxy's memory every 0.5 s until BURST_SETTLE_S after the
        last connection closed; the last reading is the settled one."""
        t0 = rec.pop("burst_end_mono")
        series = []
        step = 0.5
        k = 1
        while True:
            at = t0 + min(k * step, BURST_SETTLE_S)
            time.sleep(max(0.0, at - time.monotonic()))
            pids = t.pids()
            if not pids:
                return
            m = procs.memory_kb(pids)
            series.append({"after_s": round(at - t0, 2), **m})
            if at - t0 >= BURST_SETTLE_S - 1e-9:
                break
            k += 1
        rec["mem_settle_series"] = series
        rec["mem_settled_kb"] = {"pss_kb": series[-1]["pss_kb"], "rss_kb": series[-1]["rss_kb"]}
        rec["settle_s"] = BURST_SETTLE_S

    # -- the whole matrix ------------------------------------------------------
    def run(self, on_record=None) -> list[dict]:
        live = [t for t in self.targets if t.available]
        for rnd in range(1, self.rounds + 1):
            for sc in self.scenarios:
                # A B A B: every target once per scenario per round; the order rotates
                # from round to round so no target is always first or last.
                k = (rnd - 1) % max(1, len(live))
                order = live[k:] + live[:k]
                for t in order:
                    if not self.applies(t, sc):
                        continue
                    rec = self.run_one(t, sc, rnd)
                    self.runs.append(rec)
                    if on_record:
                        on_record(rec, sc, t)
                    time.sleep(0.3)
        return self.runs
