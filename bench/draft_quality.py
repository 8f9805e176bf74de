"""R2R's HumanEval pass@1 with the SLM on a drafting head, beside a saved run of the same R2R on the whole head.

    python -m bench.draft_quality --saved bench/results/cpu-epyc-humaneval164 --limit 48 --slm-draft-vocab 49152

The saved folder is a harness run (`bench/harness.py --out DIR`): its `answers/r2r-*.json` (the R2R run, at its
threshold and session count), `answers/llm-1.json` and `answers/slm-0.json`. This runs R2R again through the
services at the same threshold, sessions and token budget on the first --limit problems, the SLM worker on a
drafting head (`--slm-draft-vocab N`, worker/draft_vocab.py), grades it and the saved answers to the same
problems with the same sandboxed check, and writes `draft_quality-<date>.json` (pass@1, LLM shares) under --out.
The saved runs come from another day: compare them on one machine kind only (their `machine` is printed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench import humaneval, runner
from bench.args import add_pair_args, resolve_pair
from bench.harness import new_progress
from bench.machine import write_stamped


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pair_args(p)
    p.add_argument("--saved", required=True, help="a harness --out folder with answers/")
    p.add_argument("--run", default="r2r-0.1", help="the saved R2R run's file name in answers/ (without .json)")
    p.add_argument("--limit", type=int, default=48, help="the first N HumanEval problems")
    p.add_argument("--out", default="bench/results")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    slm, llm = resolve_pair(args)
    from r2r_serve.models.pair_config import load_pair_config

    answers = Path(args.saved) / "answers"
    saved = {name: json.loads((answers / f"{name}.json").read_text()) for name in (args.run, "llm-1", "slm-0")}
    r2r = saved[args.run]
    print(f"saved runs from {r2r['machine']} on {r2r['date']}: threshold {r2r['threshold']:.4f}, "
          f"{r2r['sessions']} sessions, {r2r['max_tokens']} tokens")
    problems = humaneval.load_problems(args.limit)
    keys = {p.task_id for p in problems}
    requests = [runner.Request(p.task_id, humaneval.chat_messages(p)) for p in problems]
    checkpoint = None if args.tiny else load_pair_config().router_checkpoint
    services = runner.start_services(slm, llm, device=args.device, slm_dtype=args.slm_dtype, llm_dtype=args.llm_dtype,
                                     strategies={r2r["strategy"]: checkpoint}, threads=args.threads,
                                     slm_draft_vocab=args.slm_draft_vocab)
    try:
        with new_progress() as progress:
            result = runner.run_requests(services.coordinators[r2r["strategy"]], requests, threshold=r2r["threshold"],
                                         max_tokens=r2r["max_tokens"], sessions=r2r["sessions"], progress=progress,
                                         label=f"R2R, drafting head {args.slm_draft_vocab}")
    finally:
        services.stop()
    texts = {f"{args.run}-draft{args.slm_draft_vocab}": {o.key: o.text for o in result.outcomes}}
    shares = {name: result.llm_share for name in texts}
    for name, run in saved.items():
        picked = [o for o in run["outcomes"] if o["key"] in keys]
        texts[name] = {o["key"]: o["text"] for o in picked}
        tokens = sum(o["completion_tokens"] for o in picked)
        shares[name] = sum(o["llm_share"] * o["completion_tokens"] for o in picked) / tokens if tokens else None
    rows = {}
    for name, completions in texts.items():
        graded = humaneval.evaluate(problems, completions, progress=False)
        rows[name] = dict(pass1=graded["pass@1"], llm_share=shares[name])
        print(f"{name:28s} pass@1 {graded['pass@1']:.1%}  LLM share {shares[name]:.1%}")
    write_stamped(Path(args.out), "draft_quality", dict(problems=args.limit, saved=str(args.saved),
                  saved_machine=r2r["machine"], saved_date=r2r["date"], threshold=r2r["threshold"],
                  slm_draft_vocab=args.slm_draft_vocab, runs=rows), args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
