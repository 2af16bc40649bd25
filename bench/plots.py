"""PNG plots of throughput, proxy CPU per unit of work, latency and memory per tunnel."""
from __future__ import annotations

from pathlib import Path

from .scenarios import SCENARIOS
from .targets import LABELS

COLORS = {
    "noproxy": "#9e9e9e",
    "fastws": "#d62728",
    "fastws-epoll": "#9467bd",
    "fastws-blind": "#ff9896",
    "nginx": "#2ca02c",
    "haproxy": "#1f77b4",
    "haproxy-splice": "#17becf",
}


def _bars(ax, summ, targets, key, title, ylabel):
    names, med, lo, hi, cols, failed = [], [], [], [], [], []
    for t in targets:
        s = summ.get(t, {}).get(key)
        if not s:
            if summ.get(t, {}).get("runs") and not summ[t].get("ok"):
                failed.append(len(names))   # every round failed: show it, don't hide it
                names.append(LABELS[t])
                med.append(0.0)
                lo.append(0.0)
                hi.append(0.0)
                cols.append(COLORS.get(t, "#777777"))
            continue
        names.append(LABELS[t])
        med.append(s["median"])
        lo.append(s["median"] - s["min"])
        hi.append(s["max"] - s["median"])
        cols.append(COLORS.get(t, "#777777"))
    if not names:
        ax.set_visible(False)
        return
    x = range(len(names))
    ax.bar(x, med, color=cols, yerr=[lo, hi], capsize=3, error_kw={"elinewidth": 1})
    top = max((m + h for m, h in zip(med, hi)), default=0)
    if top > 0:
        ax.set_ylim(0, top * 1.15)   # room for the value labels
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    for i, v in enumerate(med):
        if i in failed:
            ax.annotate("FAILED", (i, 0), ha="center", va="bottom", fontsize=8, color="#d62728",
                        xytext=(0, 2), textcoords="offset points")
            continue
        ax.annotate(f"{v:,.3g}" if v < 1000 else f"{v:,.0f}", (i, v + hi[i]), ha="center", va="bottom",
                    fontsize=7, xytext=(0, 2), textcoords="offset points")


def write_plots(summary: dict, scenario_keys: list[str], targets: list[str], out: Path, subtitle: str) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.patches  # noqa: F401  (legend handles)
    import matplotlib.pyplot as plt

    written = []
    scs = [s for s in SCENARIOS if s.key in scenario_keys]

    def grid(n):
        cols = min(4, max(1, n))
        rows = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
        for ax in axes.flat[n:]:
            ax.set_visible(False)
        return fig, axes.flat

    # throughput
    tp = [s for s in scs if not s.idle]
    if tp:
        fig, axes = grid(len(tp))
        for ax, sc in zip(axes, tp):
            _bars(ax, summary[sc.key], targets, "throughput", sc.title, sc.rate_label)
        fig.suptitle(f"Throughput per target (median, bars min–max over rounds; higher is better)\n{subtitle}", fontsize=10)
        fig.tight_layout()
        p = out / "throughput.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

    # CPU per unit
    proxies = [t for t in targets if t != "noproxy"]
    fig, axes = grid(len(scs))
    for ax, sc in zip(axes, scs):
        _bars(ax, summary[sc.key], proxies, "cpu_per_unit", sc.title, sc.cpu_label)
    fig.suptitle(f"Proxy CPU time per unit of work (utime+stime of all its processes; lower is better)\n{subtitle}", fontsize=10)
    fig.tight_layout()
    p = out / "cpu.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)

    # latency: grouped p50 / p99 / p99.9 per target
    lat = [s for s in scs if s.latency]
    if lat:
        fig, axes = grid(len(lat))
        for ax, sc in zip(axes, lat):
            summ = summary[sc.key]
            ts = [t for t in targets if summ.get(t, {}).get("p50")]
            if not ts:
                ax.set_visible(False)
                continue
            w = 0.8 / len(ts)
            for i, t in enumerate(ts):
                vals = [summ[t][q]["median"] for q in ("p50", "p99", "p999")]
                xs = [j + (i - (len(ts) - 1) / 2) * w for j in range(3)]
                ax.bar(xs, vals, width=w, color=COLORS.get(t), label=LABELS[t])
            ax.set_xticks([0, 1, 2])
            ax.set_xticklabels(["p50", "p99", "p99.9"], fontsize=8)
            ax.set_yscale("log")
            ax.set_ylabel("latency µs (log scale)", fontsize=8)
            ax.set_title(sc.title, fontsize=9)
            ax.tick_params(axis="y", labelsize=8)
            ax.grid(axis="y", alpha=0.3, which="both")
        handles = [matplotlib.patches.Patch(color=COLORS.get(t), label=LABELS[t]) for t in targets]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
        fig.suptitle(f"Round-trip latency under load (median over rounds; lower is better)\n{subtitle}", fontsize=10)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        p = out / "latency.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

    # memory: per idle tunnel, and what a burst of oversized heads leaves behind
    mem = [s for s in scs if s.idle or s.burst]
    if mem:
        fig, axes = grid(len(mem))
        for ax, sc in zip(axes, mem):
            if sc.burst:
                _bars(ax, summary[sc.key], proxies, "pss_growth_mb", "Burst of oversized heads:\nPSS 2 s after it − before it",
                      "proxy PSS MB (10^6 B)")
                line, text = 5.0, "fastws target: 5 MB"
            else:
                held = max((v.get("tunnels", 0) for v in summary[sc.key].values()), default=0)
                title = sc.title + (f"\n({held:,} held: fd limit, see notes)" if held and held != sc.conns else "")
                _bars(ax, summary[sc.key], proxies, "pss_per_tunnel_b", title + "\n(PSS after − before, per tunnel)",
                      "proxy PSS bytes per tunnel")
                line, text = (1024, "fastws target: 1,024 B") if sc.key == "idle-5k" else (None, "")
            if ax.get_visible() and line is not None:
                ax.axhline(line, color="#d62728", linestyle="--", linewidth=1)
                ax.annotate(text, (1.0, line), xycoords=("axes fraction", "data"),
                            ha="right", va="bottom", fontsize=7, color="#d62728",
                            xytext=(-2, 2), textcoords="offset points",
                            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
        fig.suptitle(f"Proxy memory (PSS over its processes; lower is better)\n{subtitle}", fontsize=10)
        fig.tight_layout()
        p = out / "memory.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written
