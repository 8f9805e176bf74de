"""Harness output: `summary.json` (the schema anyone can compare runs with), a rich table, the Markdown
table the README quotes, and plots: quality vs LLM share; quality vs speed with its Pareto front; aggregate
tokens/s vs concurrent sessions when the run had a sweep."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

COLORS = {"slm": "#4c78a8", "llm": "#e45756", "r2r": "#54a24b", "r2r-entropy": "#f58518", "r2r-random": "#9d9d9d",
          "assisted": "#b279a2", "r2r-prefetch": "#2a7f3a",
          "r2r-nolookahead": "#8c6d31", "r2r-adaptive": "#17becf"}


def _fmt(x, spec=".2f", none="–"):
    return none if x is None else format(x, spec)


def _pct(x) -> str:
    return _fmt(x and 100 * x, ".1f") + ("%" if x is not None else "")


def print_table(summary: dict, console: Console) -> None:
    t = Table(title=f"{summary['model_pair']} on {summary['machine']}")
    for col in ("run", "threshold", "sessions", "tok/s (median)", "aggregate tok/s", "TTFT s", "ITL ms",
                "LLM share", "pass@1", "problems", "measured/ideal", "overhead"):
        t.add_column(col, justify="right")
    for r in summary["runs"]:
        t.add_row(r["name"], _fmt(r["threshold"], ".3g"), str(r["sessions"]), _fmt(r["tokens_per_s"]),
                  _fmt(r["aggregate_tokens_per_s"]), _fmt(r.get("ttft_s")), _fmt(r.get("itl_ms"), ".0f"),
                  _fmt(100 * r["llm_share"], ".1f") + "%", _fmt(r["humaneval_pass1"] and 100 * r["humaneval_pass1"], ".1f"),
                  str(r["problems"]), _fmt(r.get("measured_over_ideal")), _pct(r.get("service_overhead")))
    console.print(t)


def markdown_table(summary: dict) -> str:
    """The README's table (the quality runs, timed at one session unless --quality-only; the concurrency
    sweep is a second table)."""
    sessions = _speed_sessions(summary)
    lines = [f"| run | threshold | LLM share | HumanEval pass@1 | problems | tok/s (median, {sessions} session"
             f"{'s' if sessions > 1 else ''}) | TTFT s | vs LLM | measured / ideal | service overhead |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    main_runs = [r for r in summary["runs"] if not r.get("sweep")]
    llm = next((r for r in main_runs if r["name"] == "llm"), None)
    for r in main_runs:
        speedup = r["tokens_per_s"] / llm["tokens_per_s"] if llm and llm["tokens_per_s"] and r["tokens_per_s"] else None
        pass1 = r["humaneval_pass1"]
        lines.append(f"| {r['name']} | {_fmt(r['threshold'], '.3g')} | {100 * r['llm_share']:.1f}% | "
                     f"{_fmt(pass1 and 100 * pass1, '.1f')}{'%' if pass1 is not None else ''} | {r['problems']} | "
                     f"{_fmt(r['tokens_per_s'])} | {_fmt(r.get('ttft_s'))} | {_fmt(speedup)}x | "
                     f"{_fmt(r.get('measured_over_ideal'))} | {_pct(r.get('service_overhead'))} |")
    sweep = [r for r in summary["runs"] if r.get("sweep")]
    if sweep:
        lines += ["", "| run | sessions | aggregate tok/s | per-request tok/s (median) | LLM share | "
                  "where the time goes (workers' forward seconds / wall) |", "|---|---|---|---|---|---|"]
        for r in sweep:
            lines.append(f"| {r['name']} | {r['sessions']} | {r['aggregate_tokens_per_s']:.2f} | "
                         f"{r['tokens_per_s']:.2f} | {100 * r['llm_share']:.1f}% | {time_split(r.get('workers_forward'))} |")
    return "\n".join(lines) + "\n"


def time_split(workers: dict | None) -> str:
    """A run's wall time and each worker pool's forward seconds in it, by kind: "wall 40.1 s; SLM 30.2
    (decode 28.9, prefill 1.3); LLM 21.0 (prefill 12.5, catch-up 8.5)". On shared cores the two pools' seconds
    can add up to more than the wall time (they overlap)."""
    if not workers or "by_kind" not in workers:
        return "–"
    parts = [f"wall {workers['wall_s']:.1f} s"]
    for role in ("slm", "llm"):
        kinds = workers["by_kind"][role]
        named = [(label, kinds[key]) for key, label in (("decode_s", "decode"), ("prefill_s", "prefill"),
                                                        ("extend_s", "catch-up")) if kinds[key] >= 0.05]
        inner = f" ({', '.join(f'{label} {v:.1f}' for label, v in named)})" if named else ""
        parts.append(f"{role.upper()} {workers[f'{role}_s']:.1f}{inner}")
    return "; ".join(parts)


def write(summary: dict, out_dir: Path, console: Console) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    stamp = summary["date"][:19].replace(":", "").replace("-", "")
    (out_dir / f"summary-{stamp}.json").write_text(json.dumps(summary, indent=1))
    (out_dir / "summary.md").write_text(markdown_table(summary))
    console.print(f"wrote {out_dir / 'summary.json'} and summary.md")
    try:
        plot_quality_vs_share(summary, out_dir / "quality_vs_share.png")
        plot_pareto(summary, out_dir / "quality_vs_speed.png")
        console.print(f"wrote {out_dir / 'quality_vs_share.png'} and quality_vs_speed.png")
        if any(r.get("sweep") for r in summary["runs"]):
            plot_sweep(summary, out_dir / "sweep.png")
            console.print(f"wrote {out_dir / 'sweep.png'}")
    except ImportError:
        console.print("matplotlib not installed: no plots (pip install -e .[bench])")


def _family(name: str) -> str:
    for variant in ("-prefetch", "-nolookahead"):  # coordinator variants, whichever router they run with
        if name.endswith(variant):
            return "r2r" + variant
    if "-adaptive" in name:  # r2r-adaptiveN: the coordinator's --llm-only-above-sessions N
        return "r2r-adaptive"
    return name if name in COLORS else "r2r"


def _quality_runs(summary: dict) -> list[dict]:
    return [r for r in summary["runs"] if r["humaneval_pass1"] is not None and not r.get("sweep")]


def _speed_sessions(summary: dict) -> int:
    """Sessions the quality runs' tok/s were measured at: 1, or --quality-sessions in a --quality-only run."""
    return max((r["sessions"] for r in summary["runs"] if not r.get("sweep")), default=1)


def _subtitle(summary: dict) -> str:
    return f"{summary['model_pair']}\n{summary.get('device', '')}: {summary['machine'][:80]}, {summary['date'][:10]}"


def _finish(fig, ax, xlabel: str, title: str, summary: dict, path: Path, ylabel: str = "HumanEval pass@1 (%)") -> None:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}\n{_subtitle(summary)}", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_quality_vs_share(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _quality_runs(summary)
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for family in ("r2r", "r2r-entropy", "r2r-random"):
        pts = sorted((r["llm_share"], r["humaneval_pass1"]) for r in runs if r["name"] == family)
        if pts:
            ax.plot([100 * x for x, _ in pts], [100 * y for _, y in pts], "o-", color=COLORS[family],
                    label={"r2r": "R2R, trained router", "r2r-entropy": "R2R, entropy router",
                           "r2r-random": "R2R, random router"}[family])
    for name, label in (("slm", "SLM alone"), ("llm", "LLM alone"), ("assisted", "assisted generation")):
        for r in runs:
            if r["name"] == name:
                ax.scatter([100 * r["llm_share"]], [100 * r["humaneval_pass1"]], s=40 if name == "assisted" else 90,
                           marker="D" if name == "assisted" else "s", color=COLORS[name], zorder=4 if name == "assisted" else 3,
                           label=f"{label} ({r['problems']} problems)" if name == "assisted" else label)
    _finish(fig, ax, "LLM token share (%)", "Quality vs LLM share", summary, path)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten on both speed (x) and quality (y), sorted by speed."""
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return sorted(front)


def plot_pareto(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in _quality_runs(summary) if r["tokens_per_s"]]
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    seen = set()
    for r in runs:
        fam = _family(r["name"])
        ax.scatter([r["tokens_per_s"]], [100 * r["humaneval_pass1"]], color=COLORS[fam], s=50, zorder=3,
                   label=fam if fam not in seen else None)
        seen.add(fam)
        if fam.startswith("r2r"):
            ax.annotate(f"{100 * r['llm_share']:.0f}%", (r["tokens_per_s"], 100 * r["humaneval_pass1"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
    front = pareto_front([(r["tokens_per_s"], 100 * r["humaneval_pass1"]) for r in runs])
    if len(front) > 1:
        ax.plot(*zip(*front), "--", color="black", alpha=0.5, label="Pareto front")
    sessions = _speed_sessions(summary)
    _finish(fig, ax, f"tokens/s per request (median, {sessions} session{'s' if sessions > 1 else ''})",
            "Quality vs speed (R2R points labelled with their LLM share)", summary, path)


def plot_sweep(summary: dict, path: Path) -> None:
    """Aggregate tokens/s against concurrent sessions, one line per run: where batching pays, and where the
    LLM alone overtakes R2R (the crossover --llm-only-above-sessions is set from)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name: dict[str, list[tuple[int, float, float]]] = {}
    for r in summary["runs"]:
        if r.get("sweep"):
            by_name.setdefault(r["name"], []).append((r["sessions"], r["aggregate_tokens_per_s"], r["llm_share"]))
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for name, pts in by_name.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=COLORS.get(_family(name), "black"), label=name)
        if name.startswith("r2r"):
            for sessions, agg, share in pts:
                ax.annotate(f"{100 * share:.0f}%", (sessions, agg), fontsize=7, xytext=(4, -9),
                            textcoords="offset points")
    ax.set_xscale("log", base=2)
    sessions = sorted({p[0] for pts in by_name.values() for p in pts})
    ax.set_xticks(sessions, [str(x) for x in sessions])
    _finish(fig, ax, "concurrent sessions", "Throughput vs concurrency (R2R points labelled with their LLM share)",
            summary, path, ylabel="aggregate tokens/s")
