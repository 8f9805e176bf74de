"""Grade saved runs again: HumanEval pass@1 of answers files the harness wrote (<out>/answers/*.json).

    python -m bench.grade bench/results/cpu-amx-humaneval164/answers/*.json

Useful when a long run stopped before its summary: every finished run is on disk with its answers, and
this grades them with the same sandboxed check the harness uses, pairs each run with the LLM's (which
problems changed hands) and writes the figures as JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import humaneval  # noqa: E402
from bench.harness import paired_differences  # noqa: E402


def grade_file(path: Path, workers: int) -> dict:
    """One saved run, graded: its plan, realized LLM share, pass@1 and the problems it passed."""
    record = json.loads(path.read_text())
    texts = {o["key"]: o["text"] for o in record["outcomes"]}
    problems = [p for p in humaneval.load_problems() if p.task_id in texts]
    graded = humaneval.evaluate(problems, texts, workers=workers, progress=False)
    tokens = sum(o["completion_tokens"] for o in record["outcomes"])
    llm_tokens = sum(o["sources"].count("llm") for o in record["outcomes"])
    return dict(name=record["name"], threshold=record["threshold"], target_share=record["target_share"],
                sessions=record["sessions"], machine=record.get("machine"), problems=graded["problems"],
                humaneval_pass1=graded["pass@1"], llm_share=llm_tokens / tokens if tokens else 0.0,
                completion_tokens=tokens, aggregate_tokens_per_s=tokens / record["wall_s"] if record["wall_s"] else 0.0,
                passed_tasks=sorted(k for k, v in graded["results"].items() if v["passed"]), file=str(path))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path, help="answers files (calibration.json is skipped)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--json", type=Path, help="write the graded runs and their paired differences here")
    args = p.parse_args(argv)
    runs = [grade_file(f, args.workers) for f in args.files if f.name != "calibration.json"]
    print("| run | threshold | LLM share | pass@1 | problems | sessions | aggregate tok/s |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['name']} | {r['threshold']:g} | {100 * r['llm_share']:.1f}% | {100 * r['humaneval_pass1']:.1f}% | "
              f"{r['problems']} | {r['sessions']} | {r['aggregate_tokens_per_s']:.2f} |")
    paired = paired_differences(runs)
    for name, diff in paired.items():
        print(f"{name}: only the LLM passes {len(diff['only_llm_passes'])}, only this run passes "
              f"{len(diff['only_this_passes'])}")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "paired": paired}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
