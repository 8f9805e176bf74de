"""Speed of R2R vs the SLM alone vs the LLM alone, through the real services, in one run.

    python bench/speed.py                      # the default pair (prepared by `r2r models prepare`)
    python bench/speed.py --tiny /tmp/tiny     # tiny random models, a smoke run

Starts the four services as local processes (as `r2r serve` does), sends the same prompts in each mode
(interleaved, so drift hits every mode alike) and reports per-request medians and ratios. Modes differ
only by the request's router threshold: > 1 never routes (SLM alone), 0 always routes (LLM alone; the SLM
is not consulted), anything between is R2R. Writes JSON and a PNG under bench/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench.*` importable as a script

from rich.console import Console  # noqa: E402
from rich.progress import Progress
from rich.table import Table  # noqa: E402

from bench.args import add_pair_args  # noqa: E402
from bench.machine import machine_description  # noqa: E402

PROMPTS = [
    "Write a Python function that reverses a string.",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Write a Python function that checks whether a string is a palindrome, ignoring case and spaces.",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Write a Python class for a stack with push, pop and peek.",
    "Write a Python function that counts the words in a text and returns the 3 most common.",
]

console = Console()


def start_services(args):
    from r2r_serve.cli import resolve_models
    from r2r_serve.launcher import LocalCluster, start_deployment

    slm, llm, _ = resolve_models(args)
    cluster = LocalCluster(args.log_dir)
    with console.status("starting SLM worker, LLM worker, router and coordinator ..."):
        d = start_deployment(cluster, slm=slm, llm=llm, slm_dtype=args.slm_dtype, llm_dtype=args.llm_dtype,
                             device=args.device, threads=args.threads, router_strategy=args.router_strategy,
                             router_checkpoint=args.router_checkpoint, say=lambda *a, **k: None)
    return cluster, d.coordinator, slm, llm


def run(args) -> dict:
    from r2r_client import R2RClient

    cluster, target, slm, llm = start_services(args)
    results: dict[str, list[dict]] = {}
    try:
        with R2RClient(target, wait_for_ready=True) as client:
            info = client.server_info()
            r2r_threshold = args.threshold if args.threshold is not None else info.default_threshold
            modes = {"slm": 2.0, "llm": 0.0, "r2r": r2r_threshold}
            prompts = PROMPTS[: args.prompts]
            # One untimed request per mode: first-call costs are not what we measure.
            for threshold in modes.values():
                client.generate([{"role": "user", "content": "Say hi."}], max_tokens=4, threshold=threshold)
            total = args.repeats * len(prompts) * len(modes)
            with Progress(console=console) as progress:
                task = progress.add_task("requests", total=total)
                for rep in range(args.repeats):
                    for i, prompt in enumerate(prompts):
                        for mode, threshold in modes.items():
                            r = client.generate([{"role": "user", "content": prompt}], max_tokens=args.max_tokens,
                                                threshold=threshold)
                            s = r.stats
                            decode_s = s.total_s - s.time_to_first_token_s
                            results.setdefault(mode, []).append(dict(
                                prompt=i, repeat=rep, tokens=s.completion_tokens, total_s=s.total_s,
                                ttft_s=s.time_to_first_token_s, tokens_per_s=s.tokens_per_s,
                                decode_tokens_per_s=(s.completion_tokens - 1) / decode_s if decode_s > 0 else 0.0,
                                llm_share=s.llm_share, finish=s.finish_reason))
                            progress.advance(task)
    finally:
        cluster.stop()

    def median(mode, key):
        return statistics.median(x[key] for x in results[mode])

    summary = {mode: {key: median(mode, key) for key in ("tokens_per_s", "decode_tokens_per_s", "ttft_s",
                                                           "llm_share", "tokens")} for mode in results}
    for mode in summary:
        summary[mode]["threshold"] = modes[mode]
        summary[mode]["speedup_vs_llm"] = summary[mode]["tokens_per_s"] / summary["llm"]["tokens_per_s"]
    return dict(machine=machine_description(), date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                model_pair=f"{slm} + {llm}", slm_dtype=args.slm_dtype, llm_dtype=args.llm_dtype,
                router=args.router_strategy, max_tokens=args.max_tokens, repeats=args.repeats,
                prompts=len(prompts), summary=summary, requests=results)


def report(out: dict, out_dir: Path) -> None:
    table = Table(title=f"median per request, {out['prompts']} prompts x {out['repeats']} repeats")
    for col in ("mode", "threshold", "tokens/s", "decode tok/s", "TTFT s", "LLM share", "vs LLM"):
        table.add_column(col, justify="right")
    for mode, s in out["summary"].items():
        table.add_row(mode, f"{s['threshold']:.3g}", f"{s['tokens_per_s']:.2f}", f"{s['decode_tokens_per_s']:.2f}",
                      f"{s['ttft_s']:.2f}", f"{100 * s['llm_share']:.1f}%", f"{s['speedup_vs_llm']:.2f}x")
    console.print(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = out["date"][:19].replace(":", "").replace("-", "")
    path = out_dir / f"speed-{stamp}.json"
    path.write_text(json.dumps(out, indent=1))
    (out_dir / "speed_latest.json").write_text(json.dumps(out, indent=1))
    console.print(f"wrote {path}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("matplotlib not installed: no plot (pip install -e .[bench])")
        return
    modes = list(out["summary"])
    values = [out["summary"][m]["tokens_per_s"] for m in modes]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(modes, values, color=["#7aa6c2", "#c27a7a", "#8bc27a"][: len(modes)])
    for bar, m in zip(bars, modes):
        s = out["summary"][m]
        ax.annotate(f"{s['tokens_per_s']:.2f} tok/s\nLLM {100 * s['llm_share']:.0f}%", (bar.get_x() + bar.get_width() / 2,
                    bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("tokens/s per request (median)")
    ax.set_title(f"R2R vs SLM vs LLM ({out['slm_dtype']}/{out['llm_dtype']})", fontsize=10)
    ax.set_ylim(0, max(values) * 1.3)
    fig.tight_layout()
    fig.savefig(out_dir / "speed.png", dpi=120)
    console.print(f"wrote {out_dir / 'speed.png'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pair_args(p, "auto")  # as r2r serve: each worker resolves auto for its machine
    p.add_argument("--router-strategy", default="auto")
    p.add_argument("--router-checkpoint")
    p.add_argument("--threshold", type=float, default=None, help="R2R threshold (default: the router's)")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--log-dir")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report(run(args), Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
