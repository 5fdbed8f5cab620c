"""The trade-off curve as a PNG (matplotlib, Agg backend): polls per task vs p95."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from _forms import KNOB
from _oracle import front_for

__all__ = ["plot_tradeoff"]


def plot_tradeoff(results: dict[str, Any], path: Path) -> bool:
    """Draw one panel per workload of the ``curve`` rows into ``path``; False if nothing to draw."""
    rows = [r for r in results.get("rows", []) if r["section"] == "curve"]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    if not workloads:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import ScalarFormatter
    except ImportError:
        print("matplotlib is not installed: no trade-off PNG")
        return False
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4.2), squeeze=False)
    for ax, workload in zip(axes[0], workloads, strict=True):
        mine = sorted(
            (r for r in rows if r["workload"] == workload and r["client"] == "novita"),
            key=lambda r: r["policy"][KNOB],
        )
        loops = sorted(
            (r for r in rows if r["workload"] == workload and r["client"] != "novita"),
            key=lambda r: float(r["client"].removeprefix("loop-")),
        )
        ax.plot(
            [r["polls_per_task"] for r in mine],
            [r["latency_p95_s"] for r in mine],
            "o-",
            color="tab:blue",
            label=f"novita_async ({KNOB})",
        )
        for r in mine:
            ax.annotate(
                f"{r['policy'][KNOB]:g}",
                (r["polls_per_task"], r["latency_p95_s"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
                color="tab:blue",
            )
        ax.plot(
            [r["polls_per_task"] for r in loops],
            [r["latency_p95_s"] for r in loops],
            "s--",
            color="tab:red",
            label="fixed-interval loop",
        )
        for r in loops:
            ax.annotate(
                r["client"].removeprefix("loop-") + " s",
                (r["polls_per_task"], r["latency_p95_s"]),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize=8,
                color="tab:red",
            )
        front = front_for(results, workload)
        if front:
            most = max([r["polls_per_task"] for r in mine + loops], default=8.0) * 1.2
            shown = [(p95, polls) for p95, polls in front if polls <= most]
            ax.plot(
                [polls for _, polls in shown],
                [p95 for p95, _ in shown],
                linestyle=":",
                color="tab:gray",
                label="oracle (knows each task's duration distribution)",
            )
        ax.set_title(f"{workload} ({results['sizes']['curve']} prompts)")
        ax.set_xlabel("polls per task")
        ax.set_ylabel("added latency p95 (s)")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Polls vs latency ({results['date']}); lower-left is better", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
