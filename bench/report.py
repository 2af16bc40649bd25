"""Summaries over rounds, Markdown tables, and the fastws targets check."""
from __future__ import annotations

import statistics

from .scenarios import BURST_SETTLE_S, BY_KEY, SCENARIOS, Scenario
from .targets import LABELS, PEERS


def _stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(runs: list[dict], scenario_keys: list[str], target_names: list[str]) -> dict:
    out: dict = {}
    for sk in scenario_keys:
        out[sk] = {}
        for tn in target_names:
            rs = [r for r in runs if r["scenario"] == sk and r["target"] == tn]
            ok = [r for r in rs if r["ok"]]
            s = {"runs": len(rs), "ok": len(ok),
                 "errors": [f"round {r['round']}: {r['error']}" for r in rs if not r["ok"] and r.get("error")]}
            s["throughput"] = _stats([r.get("throughput") for r in ok])
            s["cpu_per_unit"] = _stats([r.get("cpu_per_unit") for r in ok])
            for q in ("p50", "p99", "p999"):
                s[q] = _stats([r["lat_us"][q] for r in ok if "lat_us" in r])
            s["pss_per_tunnel_b"] = _stats([r.get("pss_per_tunnel_b") for r in ok])
            s["rss_per_tunnel_b"] = _stats([r.get("rss_per_tunnel_b") for r in ok])
            s["reconnect_share"] = _stats([r["result"].get("reconnects", 0) / r["result"]["total_count"]
                                           for r in ok if r.get("result", {}).get("total_count")])
            s["background_cores"] = _stats([r.get("background_cores") for r in ok])
            s["tunnels"] = max([r.get("conns", 0) for r in rs], default=0)
            for k in BURST_KEYS:
                s[k] = _stats([r.get(k) for r in ok])
            s["proxy_cores"] = _stats([r.get("proxy_cores") for r in ok])
            s["loadgen_cores"] = _stats([r.get("loadgen_cores") for r in ok])
            s["resets"] = _stats([r.get("resets") for r in ok if "statuses" in r])
            # the answers each round got, e.g. "431 ×10,000"; the same in every round as a rule
            s["statuses"] = sorted({statuses_text(r["statuses"]) for r in ok if "statuses" in r})
            out[sk][tn] = s
        # fastws against a variant of itself, round by round: the two ran one after the other,
        # so a round's ratio is freer of the machine's drift than the medians'
        if "fastws" in out[sk] and "fastws-blind" in out[sk]:
            pairs = _round_pairs(runs, sk, "fastws", "fastws-blind")
            for key in ("cpu_per_unit", "throughput", "pss_per_tunnel_b"):
                out[sk]["fastws"][f"vs_blind_{key}"] = _stats(
                    [a[key] / b[key] for a, b in pairs if a.get(key) and b.get(key)])
        if "fastws-hook" in out[sk] and "fastws" in out[sk]:
            pairs = _round_pairs(runs, sk, "fastws-hook", "fastws")
            out[sk]["fastws-hook"]["added_cpu_per_unit"] = _stats(
                [a["cpu_per_unit"] - b["cpu_per_unit"] for a, b in pairs
                 if a.get("cpu_per_unit") is not None and b.get("cpu_per_unit") is not None])
        if "fastws-2w" in out[sk] and "fastws" in out[sk]:
            pairs = _round_pairs(runs, sk, "fastws-2w", "fastws")
            for key in ("cpu_per_unit", "throughput"):
                out[sk]["fastws-2w"][f"vs_one_{key}"] = _stats(
                    [a[key] / b[key] for a, b in pairs if a.get(key) and b.get(key)])
    return out


def _round_pairs(runs: list[dict], sk: str, a_name: str, b_name: str) -> list[tuple[dict, dict]]:
    return [(a, b) for a in runs for b in runs
            if a["scenario"] == b["scenario"] == sk and a["round"] == b["round"]
            and a["target"] == a_name and b["target"] == b_name and a["ok"] and b["ok"]]


BURST_KEYS = tuple(f"{m}_{w}_mb" for m in ("pss", "rss") for w in ("before", "end", "settled", "growth"))
BURST_BOUND_MB = 5.0       # fastws's settled memory within this of its start (MB = 10^6 bytes)
IDLE_BOUND_B = 1024        # fastws's PSS per idle tunnel at 5,000 tunnels


def statuses_text(statuses: dict) -> str:
    """{"431": 10000} -> "431 ×10,000"; several statuses by count, most first."""
    if not statuses:
        return "—"
    items = sorted(statuses.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{k} ×{v:,}" for k, v in items)


def _num(v: float) -> str:
    if v is None:
        return "—"
    a = abs(v)
    if a >= 100000:
        return f"{v:,.0f}"
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _mm(s) -> str:
    if not s:
        return "—"
    if s["n"] == 1:
        return _num(s["median"])
    return f"{_num(s['median'])} ({_num(s['min'])}–{_num(s['max'])})"


def _ratio(s, ref) -> str:
    if not s or not ref or not ref["median"]:
        return "—"
    return f"{s['median'] / ref['median']:.2f}x"


def _lat(s) -> str:
    return "—" if not s else _num(s["median"])


def _bg(s) -> str:
    b = s.get("background_cores")
    if not b:
        return "—"
    return f"{b['median']:.2f} (max {b['max']:.2f})"


def _mb(s, signed: bool = False) -> str:
    """A memory figure in MB: median, with min–max over rounds."""
    if not s:
        return "—"
    f = "{:+.1f}" if signed else "{:.1f}"
    if s["n"] == 1:
        return f.format(s["median"])
    return f"{f.format(s['median'])} ({f.format(s['min'])} to {f.format(s['max'])})"


def _cores(s) -> str:
    return "—" if not s else f"{s['median']:.2f}"


def burst_table(sc: Scenario, summ: dict, target_names: list[str], skipped: dict[str, str]) -> str:
    """The burst: each proxy's memory before, at the end and after it settled, then its load."""
    ref = summ.get("nginx", {})
    lines = [f"### {sc.title}", "", f"_{sc.what}._", ""]
    mem_hdr = ["target", "answered", "heads/s", "PSS before", "PSS at end", "PSS settled", "PSS settled − before",
               "RSS before", "RSS at end", "RSS settled", "RSS settled − before", "rounds ok"]
    load_hdr = ["target", sc.cpu_label, "vs nginx", "proxy busy (cores)", "wsload busy (cores)", "other CPU",
                "resets after the answer"]
    mem, load = [], []
    for tn in target_names:
        label = LABELS[tn]
        if tn == "noproxy":
            continue
        if tn in skipped:
            mem.append([label, "skipped"] + [""] * (len(mem_hdr) - 2))
            continue
        s = summ.get(tn)
        if not s or s["runs"] == 0:
            continue
        okc = f"{s['ok']}/{s['runs']}" + ("" if s["ok"] == s["runs"] else " **FAILED runs**")
        if s["ok"] == 0:
            mem.append([label, "**FAILED**"] + ["—"] * (len(mem_hdr) - 3) + [okc])
            continue
        mem.append([label, "; ".join(s["statuses"]) or "—", _mm(s["throughput"]),
                    _mb(s["pss_before_mb"]), _mb(s["pss_end_mb"]), _mb(s["pss_settled_mb"]),
                    _mb(s["pss_growth_mb"], True), _mb(s["rss_before_mb"]), _mb(s["rss_end_mb"]),
                    _mb(s["rss_settled_mb"]), _mb(s["rss_growth_mb"], True), okc])
        load.append([label, _mm(s["cpu_per_unit"]), _ratio(s["cpu_per_unit"], ref.get("cpu_per_unit")),
                     _cores(s["proxy_cores"]), _cores(s["loadgen_cores"]), _bg(s),
                     f"{s['resets']['median']:,.0f}" if s.get("resets") else "—"])
    lines.append("Memory of the proxy's processes (summed), in MB (10^6 bytes): before = the freshly started "
                 "proxy before the first connection; at end = when the last connection has closed; settled = "
                 f"{BURST_SETTLE_S:g} s later.")
    lines.append("")
    lines.append("| " + " | ".join(mem_hdr) + " |")
    lines.append("|" + "|".join(["---", "---"] + ["---:"] * (len(mem_hdr) - 2)) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in mem]
    if "noproxy" in target_names:
        lines += ["", "_No proxy: not run (there is no proxy to reject the heads)._"]
    if load:
        lines += ["", "The burst's load: the proxy's CPU per head, and how busy the proxy and the load generator "
                      "were over the burst (cores; the proxy has one to itself).", ""]
        lines.append("| " + " | ".join(load_hdr) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(load_hdr) - 1)) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in load]
        slow = [LABELS[tn] for tn in target_names if tn in summ and summ[tn].get("loadgen_cores")
                and summ[tn].get("proxy_cores") and summ[tn]["loadgen_cores"]["median"] >= 0.9
                and summ[tn]["proxy_cores"]["median"] < summ[tn]["loadgen_cores"]["median"]]
        lines.append("")
        if slow:
            lines.append(f"_**The load generator was busier than the proxy for {', '.join(slow)}**: "
                         "its rate there is the load generator's, not the proxy's._")
        else:
            lines.append("_For every target the load generator used less than 0.9 of a core, or less than the proxy: "
                         "it did not set the pace._")
        lines.append("")
        lines.append("_other CPU: CPU time used outside the bench's own processes during the burst, in cores, "
                     "median (max) over rounds; while it is high the proxy and the load generator shared the "
                     "machine with it, and heads/s moved with it._")
    errs = [(LABELS[tn], e) for tn in target_names if tn in summ for e in summ[tn]["errors"]]
    if errs:
        lines.append("")
        lines.append("Failed runs (not averaged in):")
        for label, e in errs[:10]:
            lines.append(f"- {label}, {e}")
    lines.append("")
    return "\n".join(lines)


def scenario_table(sc: Scenario, summ: dict, target_names: list[str], skipped: dict[str, str]) -> str:
    if sc.burst:
        return burst_table(sc, summ, target_names, skipped)
    ref = summ.get("nginx", {})
    lines = [f"### {sc.title}", "", f"_{sc.what}._", ""]
    if sc.idle:
        hdr = ["target", "tunnels", "proxy PSS bytes/tunnel", "vs nginx", "proxy RSS bytes/tunnel",
               sc.cpu_label, "vs nginx", "rounds ok"]
    elif sc.latency:
        hdr = ["target", sc.rate_label, "vs nginx", "p50 µs", "p99 µs", "p99.9 µs", sc.cpu_label, "vs nginx",
               "other CPU", "rounds ok"]
    else:
        hdr = ["target", sc.rate_label, "vs nginx", sc.cpu_label, "vs nginx", "other CPU", "rounds ok"]
    lines.append("| " + " | ".join(hdr) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(hdr) - 1)) + "|")
    for tn in target_names:
        label = LABELS[tn]
        if tn in skipped:
            lines.append("| " + " | ".join([label, "skipped"] + [""] * (len(hdr) - 2)) + " |")
            continue
        s = summ.get(tn)
        if not s or s["runs"] == 0:
            continue
        okc = f"{s['ok']}/{s['runs']}" + ("" if s["ok"] == s["runs"] else " **FAILED runs**")
        if s["ok"] == 0:
            lines.append("| " + " | ".join([label, "**FAILED**"] + ["—"] * (len(hdr) - 3) + [okc]) + " |")
            continue
        cpu = _mm(s["cpu_per_unit"]) if tn != "noproxy" else "n/a"
        cpur = _ratio(s["cpu_per_unit"], ref.get("cpu_per_unit")) if tn != "noproxy" else ""
        if sc.idle:
            row = [label, str(s["tunnels"]), _mm(s["pss_per_tunnel_b"]) if tn != "noproxy" else "n/a",
                   _ratio(s["pss_per_tunnel_b"], ref.get("pss_per_tunnel_b")) if tn != "noproxy" else "",
                   _mm(s["rss_per_tunnel_b"]) if tn != "noproxy" else "n/a", cpu, cpur, okc]
        elif sc.latency:
            row = [label, _mm(s["throughput"]), _ratio(s["throughput"], ref.get("throughput")),
                   _lat(s["p50"]), _lat(s["p99"]), _lat(s["p999"]), cpu, cpur, _bg(s), okc]
        else:
            row = [label, _mm(s["throughput"]), _ratio(s["throughput"], ref.get("throughput")), cpu, cpur,
                   _bg(s), okc]
        lines.append("| " + " | ".join(row) + " |")
    for tn in target_names:
        st = summ.get(tn) or {}
        rc = st.get("reconnect_share")
        if rc and rc["median"] > 0:
            lines.append("")
            lines.append(f"_{LABELS[tn]} ended keep-alive (`Connection: close`) after {100 * rc['median']:.0f}% of "
                         f"its responses (median over rounds); the load generator reconnected each time, so "
                         f"its numbers include a new TCP connection per request._")
    if not sc.idle:
        lines.append("")
        lines.append("_other CPU: CPU time used outside the bench's own processes during the measured window "
                     "(other programs, and kernel threads such as ksoftirqd), in cores, median (max) over rounds. "
                     "Throughput and latency are only comparable between targets while it stays low; "
                     "proxy CPU per unit of work much less affected._")
    errs = [(LABELS[tn], e) for tn in target_names if tn in summ for e in summ[tn]["errors"]]
    if errs:
        lines.append("")
        lines.append("Failed runs (not averaged in):")
        for label, e in errs[:10]:
            lines.append(f"- {label}, {e}")
    lines.append("")
    return "\n".join(lines)


def _med(summary, sk, tn, key):
    s = summary.get(sk, {}).get(tn, {}).get(key)
    return s["median"] if s else None


def evaluate_targets(summary: dict, available: list[str]) -> list[dict]:
    """fastws's targets, each against nginx (or the bound named), from the same run.

    Every row has "part": "check" for the targets of this check, "info" for figures shown
    for information (a later issue's targets), which do not count toward its result."""
    rows = []
    peers = [p for p in PEERS if p in available]

    def best(sk, key):
        vals = [(v, p) for p in peers if (v := _med(summary, sk, p, key)) is not None]
        return min(vals) if vals else (None, None)

    def add(name, value, bound, ok, detail, part="check"):
        rows.append({"target": name, "fastws": value, "bound": bound, "pass": ok, "detail": detail, "part": part})

    fw = "fastws" in available

    def others(sk, key, unit):
        return "; ".join(f"{LABELS[p]} {_num(_med(summary, sk, p, key))}{unit}" for p in peers
                         if _med(summary, sk, p, key) is not None) or "no peer measured"

    def vs_nginx(sk, factor, what, unit):
        if sk not in summary:
            return
        ref = _med(summary, sk, "nginx", "cpu_per_unit")
        v = _med(summary, sk, "fastws", "cpu_per_unit") if fw else None
        bound = None if ref is None else factor * ref
        add(f"{what} <= {factor:g}x nginx's", v, bound, None if v is None or bound is None else v <= bound,
            others(sk, "cpu_per_unit", unit))

    vs_nginx("handshake", 0.8, "handshake: proxy CPU per handshake", " µs")
    vs_nginx("http", 0.8, "http (small keep-alive GET): proxy CPU per request", " µs")
    if "idle-5k" in summary:
        v = _med(summary, "idle-5k", "fastws", "pss_per_tunnel_b") if fw else None
        add(f"idle-5k: PSS per idle tunnel <= {IDLE_BOUND_B:,} B", v, IDLE_BOUND_B,
            None if v is None else v <= IDLE_BOUND_B, others("idle-5k", "pss_per_tunnel_b", " B"))
    if "burst-431" in summary:
        st = summary["burst-431"].get("fastws", {}) if fw else {}
        v = _med(summary, "burst-431", "fastws", "pss_growth_mb") if fw else None
        if st.get("pss_before_mb"):
            detail = (f"fastws PSS {st['pss_before_mb']['median']:.1f} MB before, {st['pss_end_mb']['median']:.1f} at end, "
                      f"{st['pss_settled_mb']['median']:.1f} settled; RSS settled − before "
                      f"{st['rss_growth_mb']['median']:+.1f} MB; answered {'; '.join(st['statuses'])}")
        else:
            detail = "peers' PSS settled − before: " + "; ".join(
                f"{LABELS[p]} {_med(summary, 'burst-431', p, 'pss_growth_mb'):+.1f} MB" for p in peers
                if _med(summary, "burst-431", p, "pss_growth_mb") is not None)
        add(f"burst-431: PSS settled − before <= {BURST_BOUND_MB:g} MB ({BURST_SETTLE_S:g} s after the burst)", v,
            BURST_BOUND_MB, None if v is None else v <= BURST_BOUND_MB, detail)
    vs_nginx("echo-4k", 0.6, "no regression, echo 4 KB: proxy CPU per message", " µs")
    # (saturated against saturated: nginx cannot keep the paced scenarios' pace)
    for sk in ("bulk-up", "bulk-down"):
        if sk not in summary:
            continue
        ref_cpu = _med(summary, sk, "nginx", "cpu_per_unit")
        ref_tp = _med(summary, sk, "haproxy-splice", "throughput")
        v = _med(summary, sk, "fastws", "cpu_per_unit") if fw else None
        tp = _med(summary, sk, "fastws", "throughput") if fw else None
        bound = None if ref_cpu is None else 0.2 * ref_cpu
        ok = None if v is None or bound is None or ref_tp is None or tp is None else (v <= bound and tp >= ref_tp)
        add(f"no regression, {sk}: CPU per MB <= 0.2x nginx's and MB/s >= HAProxy+splice's", v, bound, ok,
            f"nginx {_num(ref_cpu)} ms/MB; HAProxy+splice {_num(ref_tp)} MB/s; fastws {_num(tp)} MB/s")
    # for information: a later issue's targets
    # (each back end of the engine: fastws runs the default, io_uring where the kernel allows it)
    backends = [(tn, tag) for tn, tag in (("fastws", ""), ("fastws-epoll", ", epoll back end"))
                if tn in available] or [("fastws", "")]     # (no fastws: the bounds alone)
    for tn, tag in backends if "echo-64" in summary else ():
        b, who = best("echo-64", "cpu_per_unit")
        v = _med(summary, "echo-64", tn, "cpu_per_unit")
        add(f"echo CPU per message (64 B) <= 0.8x best peer{tag}", v, None if b is None else 0.8 * b,
            None if v is None or b is None else v <= 0.8 * b, f"best peer {LABELS.get(who, '—')}: {_num(b)} µs",
            part="info")
    for tn, tag in backends if "chat-5k" in summary else ():
        ref = _med(summary, "chat-5k", "nginx", "cpu_per_unit")
        v = _med(summary, "chat-5k", tn, "cpu_per_unit")
        add(f"chat-5k: proxy CPU per message <= 0.8x nginx's{tag}", v, None if ref is None else 0.8 * ref,
            None if v is None or ref is None else v <= 0.8 * ref, others("chat-5k", "cpu_per_unit", " µs"),
            part="info")
    for sk, size in (("echo-64", "64 B"), ("echo-4k", "4 KB")):
        if sk not in summary:
            continue
        base = _med(summary, sk, "noproxy", "p99")
        if base is None:
            continue
        added = [(_med(summary, sk, p, "p99") - base, p) for p in peers if _med(summary, sk, p, "p99") is not None]
        b, who = min(added) if added else (None, None)
        fv = _med(summary, sk, "fastws", "p99") if fw else None
        v = None if fv is None else fv - base
        add(f"p99 latency added over no proxy, echo {size} <= best peer's", v, b,
            None if v is None or b is None else v <= b,
            f"no proxy p99 {_num(base)} µs; best peer {LABELS.get(who, '—')} adds {_num(b)} µs", part="info")
    if fw and "fastws-blind" in available:
        rows += frames_cost(summary)
    if fw and "fastws-hook" in available:
        rows += hook_cost(summary)
    if fw and "fastws-2w" in available:
        rows += scaling(summary)
    return rows


def bulk_cpu_scenario(summary: dict, sk: str) -> str:
    """Where fastws's bulk CPU per MB is judged against frames off: the paced run of `sk` when
    there is one.

    Saturated, on loopback, a proxy's account takes in part of its peers' TCP work at random:
    when it falls behind, the sender is held by the window, and the ACK the proxy sends on
    reading runs the sender's transmit (and the delivery back into the proxy's socket) in the
    proxy's own context.  A round then lands in one of two modes, about 0.27 or 0.45 ms/MB for
    the same binary here; paced below its limit, a proxy pays for its own work only
    (bench/README.md).  MB/s is read from the saturated run."""
    paced = f"{sk}-paced"
    return paced if paced in summary else sk


def _paced_label(cpu_sk: str) -> str:
    sc = BY_KEY.get(cpu_sk)
    return f" at {sc.pace_mb:,.0f} MB/s" if sc is not None and sc.pace_mb else ""


def _cpu_from(sk: str, cpu_sk: str) -> str:
    return f" (CPU per MB from {cpu_sk}, MB/s from {sk})" if cpu_sk != sk else ""


def _at_limit(summary: dict, cpu_sk: str, tn: str) -> str:
    # a proxy that could not keep a paced scenario's pace: its figure is at its limit
    sc = BY_KEY.get(cpu_sk)
    tp = _med(summary, cpu_sk, tn, "throughput")
    if sc is None or not sc.pace_mb or tp is None or tp >= 0.95 * sc.pace_mb:
        return ""
    return f" (at its limit, {_num(tp)} MB/s)"


def scaling(summary: dict) -> list[dict]:
    """Two workers against one, round by round (information: on a 2-core machine the second
    worker shares its core with the load generator)."""
    rows = []
    for sk in ("echo-64", "handshake"):
        tp = _med(summary, sk, "fastws-2w", "vs_one_throughput")
        cpu = _med(summary, sk, "fastws-2w", "vs_one_cpu_per_unit")
        if tp is None or cpu is None:
            continue
        rows.append({"target": f"{sk}: throughput with 2 workers / 1 worker (round by round)",
                     "fastws": tp, "bound": None, "pass": None,
                     "detail": f"CPU per unit {cpu:.2f}x; medians "
                               f"{_num(_med(summary, sk, 'fastws-2w', 'throughput'))} and "
                               f"{_num(_med(summary, sk, 'fastws', 'throughput'))}",
                     "part": "scaling"})
    return rows


HOOK_BOUND_US = 15.0       # a trivial synchronous hook's cost per handshake


def hook_cost(summary: dict) -> list[dict]:
    """What a location's Python hook costs per handshake: fastws with a trivial hook against
    fastws without, round by round in the same run (docs/extending.md)."""
    v, ref = _med(summary, "handshake", "fastws-hook", "cpu_per_unit"), _med(summary, "handshake", "fastws", "cpu_per_unit")
    added = _med(summary, "handshake", "fastws-hook", "added_cpu_per_unit")
    if None in (v, ref, added):
        return []
    return [{"target": f"handshake-hook: CPU per handshake <= handshake's + {HOOK_BOUND_US:g} µs "
                       "(round by round)", "fastws": added, "bound": HOOK_BOUND_US,
             "pass": added <= HOOK_BOUND_US,
             "detail": f"medians: {_num(v)} µs with the hook, {_num(ref)} µs without", "part": "hook"}]


def frames_cost(summary: dict) -> list[dict]:
    """What following WebSocket frames costs: fastws against fastws with frames = false, from
    the same run (docs/websocket.md)."""
    rows = []

    def add(name, value, bound, ok, detail):
        rows.append({"target": name, "fastws": value, "bound": bound, "pass": ok, "detail": detail,
                     "part": "frames"})

    # the ratios are the medians of each round's ratio (fastws and fastws-blind ran one after
    # the other in every round); the medians of each target are shown beside them
    for sk in ("echo-64", "echo-4k", "chat-5k"):
        v, ref = _med(summary, sk, "fastws", "cpu_per_unit"), _med(summary, sk, "fastws-blind", "cpu_per_unit")
        ratio = _med(summary, sk, "fastws", "vs_blind_cpu_per_unit")
        if None not in (v, ref, ratio):
            add(f"{sk}: CPU per message <= 1.1x frames off (round by round)", ratio, 1.1, ratio <= 1.1,
                f"medians: {_num(v)} µs with frames, {_num(ref)} µs without")
    for sk in ("bulk-up", "bulk-down"):
        cpu_sk = bulk_cpu_scenario(summary, sk)
        v, ref = _med(summary, cpu_sk, "fastws", "cpu_per_unit"), _med(summary, cpu_sk, "fastws-blind", "cpu_per_unit")
        tp, ref_tp = _med(summary, sk, "fastws", "throughput"), _med(summary, sk, "fastws-blind", "throughput")
        ratio = _med(summary, cpu_sk, "fastws", "vs_blind_cpu_per_unit")
        tp_ratio = _med(summary, sk, "fastws", "vs_blind_throughput")
        if None not in (v, ref, tp, ref_tp, ratio, tp_ratio):
            add(f"{sk}: CPU per MB{_paced_label(cpu_sk)} <= 1.05x frames off, MB/s the same (>= 0.95x) "
                f"(round by round)", ratio, 1.05, ratio <= 1.05 and tp_ratio >= 0.95,
                f"MB/s {tp_ratio:.3f}x; medians: {_num(v)}{_at_limit(summary, cpu_sk, 'fastws')} and "
                f"{_num(ref)}{_at_limit(summary, cpu_sk, 'fastws-blind')} ms/MB, "
                f"{_num(tp)} and {_num(ref_tp)} MB/s{_cpu_from(sk, cpu_sk)}")
    v, ref = _med(summary, "idle-5k", "fastws", "pss_per_tunnel_b"), _med(summary, "idle-5k", "fastws-blind", "pss_per_tunnel_b")
    if v is not None and ref is not None:
        add("idle-5k: PSS per tunnel <= frames off + 64 B", v, ref + 64, v <= ref + 64,
            f"frames off {_num(ref)} B (the frame state is in every tunnel's struct, used or not: "
            "64 B more than before frames existed)")
    return rows


def _target_rows(rows: list[dict]) -> list[str]:
    lines = ["| target | fastws | bound | result | detail |", "|---|---:|---:|---|---|"]
    for r in rows:
        res = "—" if r["pass"] is None else ("PASS" if r["pass"] else "**FAIL**")
        lines.append(f"| {r['target']} | {_num(r['fastws'])} | {_num(r['bound'])} | {res} | {r['detail']} |")
    return lines


def targets_table(rows: list[dict], fastws_note: str | None) -> str:
    check = [r for r in rows if r.get("part", "check") == "check"]
    info = [r for r in rows if r.get("part") == "info"]
    lines = ["## fastws against its targets", ""]
    if fastws_note:
        lines += [f"**Not evaluated: {fastws_note}.** The bounds below are what fastws has to meet on this machine.", ""]
    lines += ["Measured in this run, against nginx (and HAProxy + splice for bulk MB/s) in the same run. "
              "CPU is µs per handshake, request or message and ms per MB; memory is B per tunnel or MB.", ""]
    if check:
        lines += _target_rows(check)
        judged = [r for r in check if r["pass"] is not None]
        passed = sum(1 for r in judged if r["pass"])
        lines.append("")
        if not judged:
            lines.append("_No target could be judged in this run._")
        else:
            missing = len(check) - len(judged)
            lines.append(f"**{passed} of {len(judged)} targets met**"
                         + (f" ({missing} not judged: a figure is missing)" if missing else "")
                         + ("." if passed == len(judged) else
                            ": not met: " + "; ".join(r["target"].split(":")[0] for r in judged if not r["pass"]) + "."))
    else:
        lines.append("_None of the scenarios this check needs was run._")
    if info:
        lines += ["", "### For information: a later issue's targets (not part of this check)", ""]
        lines += _target_rows(info)
    frames = [r for r in rows if r.get("part") == "frames"]
    if frames:
        lines += ["", "### What following WebSocket frames costs (fastws against `frames = false`)", ""]
        lines += _target_rows(frames)
    hook = [r for r in rows if r.get("part") == "hook"]
    if hook:
        lines += ["", "### What a Python hook costs (fastws with a trivial hook against none)", ""]
        lines += _target_rows(hook)
    scale = [r for r in rows if r.get("part") == "scaling"]
    if scale:
        lines += ["", "### Workers: 2 against 1 (the 2 workers may use both cores, the load "
                  "generator's too)", ""]
        lines += _target_rows(scale)
    lines.append("")
    return "\n".join(lines)


def markdown(summary: dict, scenario_keys: list[str], target_names: list[str], skipped: dict[str, str],
             target_rows: list[dict], fastws_note: str | None) -> str:
    parts = []
    for sc in SCENARIOS:
        if sc.key in scenario_keys:
            parts.append(scenario_table(sc, summary[sc.key], target_names, skipped))
    parts.append(targets_table(target_rows, fastws_note))
    return "\n".join(parts)
