"""The sweep's PNG charts, drawn with matplotlib's Agg backend (no display needed).

matplotlib is the optional ``bench`` extra, so it is imported here only, when charts are drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from benchmarks.report import Result, series, workers_series


class ChartsUnavailable(RuntimeError):
    """matplotlib is not installed; the message says how to get it."""


def draw(
    results: Sequence[Result], out_dir: Path, first_chunk_delay_ms: float | None
) -> list[Path]:
    """``turns_per_s.png`` and ``first_output_p99.png`` over concurrent chats (log scale), and
    ``workers.png`` when a configuration ran with several worker counts."""
    try:
        import matplotlib  # noqa: PLC0415 - optional dependency, only for drawing

        matplotlib.use("Agg")
        from matplotlib.figure import Figure  # noqa: PLC0415
    except ImportError:
        raise ChartsUnavailable(
            "matplotlib is missing: pip install -e '.[bench]' (or make bench)"
        ) from None

    def chart(name: str, value: str, ylabel: str, title: str, floor_ms: float | None) -> Path:
        fig = Figure(figsize=(7.5, 4.5), dpi=120, layout="constrained")
        ax = fig.add_subplot()
        lines = series(results, value)
        for label, points in lines.items():
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=label)
        if floor_ms is not None:
            ax.axhline(floor_ms, color="grey", linestyle="--", linewidth=1)
            ax.annotate(
                f"fake LLM's delay to first chunk ({floor_ms:g} ms)",
                (0.01, floor_ms),
                xycoords=("axes fraction", "data"),
                textcoords="offset points",
                xytext=(0, 4),
                fontsize=8,
                color="grey",
            )
        ax.set_xscale("log")
        chats = sorted({x for points in lines.values() for x, _ in points})
        ax.set_xticks(chats, [f"{x:,}" for x in chats])
        ax.minorticks_off()
        ax.set_xlabel("concurrent chats")
        ax.set_ylabel(ylabel)
        ax.margins(x=0.1, y=0.1)
        ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.grid(visible=True, alpha=0.3)
        if lines:
            ax.legend(title="shards per deployment")
        path = out_dir / name
        fig.savefig(path)
        return path

    def workers_chart(name: str) -> Path | None:
        found = workers_series(results)
        if found is None:
            return None
        what, points = found
        fig = Figure(figsize=(7.5, 4.5), dpi=120, layout="constrained")
        ax = fig.add_subplot()
        labels = [str(p.workers) for p in points]
        bars = ax.bar(labels, [p.turns_per_s for p in points], color="tab:blue", alpha=0.7)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xlabel("worker processes (chatd serve --workers)")
        ax.set_ylabel("turns/s", color="tab:blue")
        ax.set_ylim(bottom=0)
        cpu = ax.twinx()
        for label, values, color in (
            ("server CPU ms/turn", [p.server_cpu_ms_per_turn for p in points], "tab:orange"),
            ("machine CPU ms/turn", [p.machine_cpu_ms_per_turn for p in points], "tab:red"),
        ):
            known = [v for v in values if v is not None]
            if len(known) == len(values):
                cpu.plot(labels, known, marker="o", color=color, label=label)
        cpu.set_ylabel("CPU ms per turn")
        cpu.set_ylim(bottom=0)
        if cpu.get_lines():
            cpu.legend(loc="lower right", fontsize=8)
        ax.set_title(f"Workers: {what}")
        path = out_dir / name
        fig.savefig(path)
        return path

    drawn = [
        chart("turns_per_s.png", "turns_per_s", "turns/s", "Throughput (closed loop)", None),
        chart(
            "first_output_p99.png",
            "first_output.p99_ms",
            "first output p99 (ms)",
            "Time to first output, p99",
            first_chunk_delay_ms,
        ),
    ]
    workers = workers_chart("workers.png")
    return drawn if workers is None else [*drawn, workers]
