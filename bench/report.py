"""Summaries over rounds, Markdown tables, and the fastws targets check."""
from __future__ import annotations

import statistics

from .scenarios import SCENARIOS, Scenario
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
            out[sk][tn] = s
    return out


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


def scenario_table(sc: Scenario, summ: dict, target_names: list[str], skipped: dict[str, str]) -> str:
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
    """Issue 3, item 6: fastws against the best peer, in the same run."""
    rows = []
    peers = [p for p in PEERS if p in available]

    def best(sk, key):
        vals = [(v, p) for p in peers if (v := _med(summary, sk, p, key)) is not None]
        return min(vals) if vals else (None, None)

    def add(name, value, bound, ok, detail):
        rows.append({"target": name, "fastws": value, "bound": bound, "pass": ok, "detail": detail})

    fw = "fastws" in available
    for sk, size in (("echo-64", "64 B"), ("echo-4k", "4 KB")):
        if sk not in summary:
            continue
        b, who = best(sk, "cpu_per_unit")
        v = _med(summary, sk, "fastws", "cpu_per_unit") if fw else None
        add(f"echo CPU per message ({size}) <= 0.8x best peer", v, None if b is None else 0.8 * b,
            None if v is None or b is None else v <= 0.8 * b, f"best peer {LABELS.get(who, '—')}: {_num(b)} µs")
    for sk in ("bulk-up", "bulk-down"):
        if sk not in summary:
            continue
        ref_cpu = _med(summary, sk, "haproxy-splice", "cpu_per_unit")
        ref_tp = _med(summary, sk, "haproxy-splice", "throughput")
        v = _med(summary, sk, "fastws", "cpu_per_unit") if fw else None
        tp = _med(summary, sk, "fastws", "throughput") if fw else None
        ok = None if v is None or ref_cpu is None else (v <= ref_cpu and tp is not None and ref_tp is not None and tp >= ref_tp)
        add(f"{sk}: CPU per MB <= 1.0x HAProxy+splice, MB/s >= it", v, ref_cpu, ok,
            f"HAProxy+splice: {_num(ref_cpu)} ms/MB at {_num(ref_tp)} MB/s; fastws {_num(tp)} MB/s")
    for sk in ("idle-5k", "idle-10k"):
        if sk not in summary:
            continue
        v = _med(summary, sk, "fastws", "pss_per_tunnel_b") if fw else None
        add(f"{sk}: memory per idle tunnel < 2 KB (PSS)", v, 2048, None if v is None else v < 2048,
            f"peers: " + ", ".join(f"{LABELS[p]} {_num(_med(summary, sk, p, 'pss_per_tunnel_b'))} B" for p in peers))
    for sk, what in (("handshake", "CPU per handshake"), ("http", "HTTP CPU per request")):
        if sk not in summary:
            continue
        b, who = best(sk, "cpu_per_unit")
        v = _med(summary, sk, "fastws", "cpu_per_unit") if fw else None
        add(f"{what} <= 1.0x best peer", v, b, None if v is None or b is None else v <= b,
            f"best peer {LABELS.get(who, '—')}: {_num(b)} µs")
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
            f"no proxy p99 {_num(base)} µs; best peer {LABELS.get(who, '—')} adds {_num(b)} µs")
    return rows


def targets_table(rows: list[dict], fastws_note: str | None) -> str:
    lines = ["## fastws against its targets (issue 3, item 6)", ""]
    if fastws_note:
        lines += [f"**Not evaluated: {fastws_note}.** The bounds below are what fastws has to meet on this machine.", ""]
    lines += ["| target | fastws | bound | result | detail |", "|---|---:|---:|---|---|"]
    for r in rows:
        res = "—" if r["pass"] is None else ("PASS" if r["pass"] else "**FAIL**")
        lines.append(f"| {r['target']} | {_num(r['fastws'])} | {_num(r['bound'])} | {res} | {r['detail']} |")
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
