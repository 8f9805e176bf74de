"""A/B of coordinator variants on one deployment, interleaved: which scheduling is faster on this machine?

One set of workers and one router; a coordinator per variant (the plain one, plus each `--variant
NAME=FLAGS`). Every round runs the same HumanEval prompts through every coordinator, in an order that
rotates each round, so slow minutes of a noisy VM fall on all variants alike. Outputs must agree across
variants (they are scheduling changes only), which the run checks. Reports median tokens/s per request and
aggregate tokens/s per variant, and writes JSON.

  python -m bench.ab --problems 3 --rounds 3 --share 0.1                       # lookahead vs --no-lookahead
  python -m bench.ab --variant prefetch=--llm-prefetch-min-tokens=16 --sessions 4
  python -m bench.ab --modes llm,slm --variant none= --problems 4 --rounds 3   # R2R vs LLM alone vs SLM alone
  python -m bench.ab --modes llm,assisted --variant none= --problems 4 --rounds 3   # ... vs HF assisted generation
  python -m bench.ab --modes llm,assisted --verify 1 --variant none= --share 0.15    # ... and served lossless verify
  python -m bench.ab --modes llm,assisted --verify 1:4,1:8 --variant none= --threshold 2  # speculative decoding
  python -m bench.ab --modes llm --variant adaptive3=--llm-only-above-sessions=3 --sessions 8 --changes-outputs

`--modes llm,slm` adds the LLM alone (threshold 0) and the SLM alone (threshold 2) on the plain coordinator to
the rotation: speed ratios between modes whose slow minutes fall alike. Only the R2R entries' outputs are
compared (the modes answer differently by design); `--changes-outputs` skips that check for variants that
change answers on purpose (--llm-only-above-sessions under load). `--variant none=` runs no variant.
`--modes assisted` adds Hugging Face assisted generation with the same pair, dtypes, threads and quantization,
in this process (the services idle meanwhile; batch 1 only, as HF assists one sequence). `--verify P` adds
verify mode (rollback_below P) on the plain coordinator at the same threshold (P = 1: lossless, the LLM's own
answers); `P:D` also sets its draft length D (max_draft_tokens; with --threshold 2 the router never routes and
this is plain speculative decoding through the services), `P:D:C` its draft stop C (min_draft_probability:
1:20:0.4 is HF assisted generation's schedule). With `--slm-draft-vocab N` the SLM worker drafts on a head over its
N most frequent tokens (worker/draft_vocab.py) and so does `assisted`'s assistant; `--modes assisted-full` adds HF
assisted generation as it ships (the assistant's whole head). With `llm` among the modes every other entry reports `same_answer_as_llm`, the share of its answers
equal to the LLM alone's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench import assisted, humaneval, runner
from bench.args import add_pair_args, resolve_pair
from bench.harness import new_progress
from bench.machine import machine_description, software_versions

console = Console()
PLAIN = "plain"


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, flags = text.partition("=")
    if name == "none" and not flags:
        return name, []
    if not name or not flags:
        raise argparse.ArgumentTypeError(f"expected NAME=FLAGS (e.g. nolookahead=--no-lookahead), got {text!r}")
    return name, flags.split()


MODE_THRESHOLDS = {"llm": 0.0, "slm": 2.0}  # the LLM alone, the SLM alone: on the plain coordinator
ASSISTED = "assisted"  # in-process HF assisted generation, no services
ASSISTED_FULL = "assisted-full"  # the same with the assistant's whole head (with --slm-draft-vocab)
# Which assistant head each in-process mode drafts with: assisted the pair's default (the workers' drafting
# head with --slm-draft-vocab), assisted-full the model's own.
ASSISTANT_HEADS = {ASSISTED: None, ASSISTED_FULL: "full"}


def rotated(names: list[str], round_index: int) -> list[str]:
    k = round_index % len(names)
    return names[k:] + names[:k]


def main(argv=None) -> int:
    args = parse_args(argv)
    slm, llm = resolve_pair(args)
    from r2r_serve.models.pair_config import load_pair_config

    checkpoint = None if args.tiny else load_pair_config().router_checkpoint
    strategy = "neural" if checkpoint else "entropy"
    problems = humaneval.load_problems(args.problems)
    requests = [runner.Request(p.task_id, humaneval.chat_messages(p)) for p in problems]
    variants = {name: flags for name, flags in (args.variant or [("nolookahead", ["--no-lookahead"])])
                if name != "none"}
    services = runner.start_services(slm, llm, device=args.device, slm_dtype=args.slm_dtype,
                                     llm_dtype=args.llm_dtype,
                                     strategies={strategy: checkpoint}, threads=args.threads, variants=variants,
                                     slm_quantize=args.slm_quantize, llm_quantize=args.llm_quantize,
                                     slm_draft_vocab=args.slm_draft_vocab, say=console.print)
    targets = {PLAIN if name == strategy else name.split("+", 1)[1]: t for name, t in services.coordinators.items()}
    r2r_names = list(targets)
    targets |= {f"{mode}-only": targets[PLAIN] for mode in args.modes if mode in MODE_THRESHOLDS}
    verify = {verify_name(*spec): spec for spec in args.verify}
    targets |= {name: targets[PLAIN] for name in verify}
    names = list(targets) + [m for m in (ASSISTED, ASSISTED_FULL) if m in args.modes]
    results: dict[str, list[runner.RunResult]] = {n: [] for n in names}
    try:
        for target in targets.values():
            runner.warm_up(target, [2.0, 0.0, 0.5])
        in_process = {ASSISTED, ASSISTED_FULL} & set(args.modes)
        pair = load_assisted(args, slm, llm, requests[0]) if in_process else None
        threshold = args.threshold
        with new_progress() as progress:
            if threshold is None:
                cal = runner.calibrate_thresholds(targets[PLAIN], requests, [args.share], max_tokens=args.max_tokens,
                                                  sessions=len(requests), progress=progress, label="calibrate")
                threshold = cal["thresholds"][args.share]
            for i in range(args.rounds):
                for name in rotated(names, i):
                    if name in in_process:
                        results[name].append(assisted.run_requests(
                            pair, requests, args.max_tokens, stop=runner.STOP, progress=progress,
                            label=f"round {i + 1} {name}", assistant_head=ASSISTANT_HEADS[name]))
                        continue
                    mode = name.removesuffix("-only")
                    results[name].append(runner.run_requests(
                        targets[name], requests, threshold=MODE_THRESHOLDS.get(mode, threshold),
                        max_tokens=args.max_tokens, **verify_params(verify.get(name)),
                        sessions=args.sessions, progress=progress, label=f"round {i + 1} {name}"))
    finally:
        services.stop()
    summary = summarize(results, threshold, args, compared=[] if args.changes_outputs else r2r_names)
    show(summary)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ab-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}.json"
    path.write_text(json.dumps(summary, indent=1))
    console.print(f"wrote {path}")
    return 0 if summary["outputs_agree"] else 1


def verify_name(rollback_below: float, max_draft: int | None = None, min_prob: float | None = None) -> str:
    return (f"verify-{rollback_below:g}" + ("" if max_draft is None else f"-draft{max_draft}")
            + ("" if min_prob is None else f"-stop{min_prob:g}"))


def verify_params(spec: tuple | None) -> dict:
    """runner.run_requests' verify-mode arguments for a parse_verify entry (None: verify mode off)."""
    p, d, c = spec or (None, None, None)
    return dict(rollback_below=p, max_draft_tokens=d, min_draft_probability=c)


def parse_verify(text: str) -> list[tuple[float, int | None, float | None]]:
    """P[:D[:C]][,...]: rollback_below P with draft length D and draft stop C (min_draft_probability); an
    empty or missing D or C leaves it to the coordinator."""
    specs = []
    for part in filter(None, text.split(",")):
        fields = part.split(":")
        try:
            if len(fields) > 3:
                raise ValueError
            p, d, c = fields + [""] * (3 - len(fields))
            specs.append((float(p), int(d) if d else None, float(c) if c else None))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected P, P:D or P:D:C (e.g. 1, 1:8 or 1:20:0.4), got {part!r}") from None
    return specs


def load_assisted(args, slm: str, llm: str, warm: runner.Request) -> "assisted.Pair":
    """The pair for HF assisted generation, loaded as the workers load theirs, after one short untimed answer
    (first-call allocations would otherwise land on the first round)."""
    pair = assisted.load_pair(slm, llm, device=args.device, slm_dtype=args.slm_dtype, llm_dtype=args.llm_dtype,
                              threads=args.threads, slm_quantize=args.slm_quantize, llm_quantize=args.llm_quantize,
                              slm_draft_vocab=args.slm_draft_vocab)
    assisted.generate(pair, warm.messages, 8, "assisted")
    return pair


def summarize(results: dict[str, list[runner.RunResult]], threshold: float, args,
              compared: list[str] | None = None) -> dict:
    """`compared`: the entries whose answers must agree (default: all)."""
    compared = list(results) if compared is None else compared
    texts = {name: [o.text for r in results[name] for o in r.outcomes] for name in compared}
    reference = next(iter(texts.values()), None)
    variants = {}
    for name, runs in results.items():
        per_request = [o.tokens_per_s for r in runs for o in r.outcomes]
        variants[name] = dict(
            tokens_per_s=statistics.median(per_request),
            aggregate_tokens_per_s=statistics.median(r.aggregate_tokens_per_s for r in runs),
            aggregate_by_round=[r.aggregate_tokens_per_s for r in runs],
            llm_share=statistics.median(r.llm_share for r in runs),
            ttft_s=statistics.median(o.ttft_s for r in runs for o in r.outcomes))
    plain = variants[PLAIN]["aggregate_tokens_per_s"]
    plain_by_round = variants[PLAIN]["aggregate_by_round"]
    for v in variants.values():
        v["aggregate_vs_plain"] = v["aggregate_tokens_per_s"] / plain if plain else None
        # Per round (the entries of one round ran minutes apart at most): the median of those ratios.
        v["vs_plain_by_round_median"] = statistics.median(
            a / b for a, b in zip(v["aggregate_by_round"], plain_by_round) if b)
    if "llm-only" in results:  # e.g. assisted and verify 1 are lossless up to rounding: how often they agree
        for name in results:
            if name == "llm-only":
                continue
            pairs = [(x.text, y.text) for a, b in zip(results[name], results["llm-only"])
                     for x, y in zip(a.outcomes, b.outcomes)]
            variants[name]["same_answer_as_llm"] = sum(x == y for x, y in pairs) / len(pairs) if pairs else None
    return dict(machine=machine_description(args.device), date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                threshold=threshold, problems=args.problems, rounds=args.rounds, sessions=args.sessions,
                max_tokens=args.max_tokens, slm_quantize=args.slm_quantize, llm_quantize=args.llm_quantize,
                modes=list(args.modes), verify=[list(v) for v in args.verify], compared=compared, versions=software_versions(),
                variants=variants, outputs_agree=all(t == reference for t in texts.values()))


def show(summary: dict) -> None:
    table = Table(title=f"A/B at threshold {summary['threshold']:.4f}, {summary['sessions']} session(s), "
                        f"{summary['rounds']} rounds")
    for col in ("variant", "tok/s per request", "aggregate tok/s", "vs plain", "vs plain (per round)", "LLM share",
                "TTFT s", "answers = LLM's"):
        table.add_column(col)
    for name, v in summary["variants"].items():
        same = v.get("same_answer_as_llm")
        table.add_row(name, f"{v['tokens_per_s']:.2f}", f"{v['aggregate_tokens_per_s']:.2f}",
                      f"{v['aggregate_vs_plain']:.3f}", f"{v['vs_plain_by_round_median']:.3f}",
                      f"{v['llm_share']:.1%}", f"{v['ttft_s']:.2f}", "-" if same is None else f"{same:.0%}")
    console.print(table)
    if not summary["outputs_agree"]:
        console.print("[red]the variants' answers differ: a scheduling change altered outputs[/]")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pair_args(p)
    p.add_argument("--variant", type=parse_variant, action="append", metavar="NAME=FLAGS",
                   help="a coordinator variant and its extra flags (repeatable; default: nolookahead=--no-lookahead)")
    p.add_argument("--modes", type=lambda t: [m for m in t.split(",") if m], default=[],
                   help="also rotate these: llm (threshold 0) and slm (threshold 2) on the plain coordinator, "
                        "assisted (HF assisted generation in this process; --sessions 1), assisted-full (the "
                        "same, its assistant on its whole head where --slm-draft-vocab gives the others a drafting head)")
    p.add_argument("--verify", type=parse_verify, default=[], metavar="P[:D[:C]][,...]",
                   help="also rotate verify mode with these rollback_below values (and draft lengths D, "
                        "max_draft_tokens, and draft stops C, min_draft_probability) on the plain coordinator")
    p.add_argument("--changes-outputs", action="store_true",
                   help="do not require the R2R entries' answers to agree (a variant that changes them on purpose)")
    p.add_argument("--problems", type=int, default=3, help="the first N HumanEval problems")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sessions", type=int, default=1, help="requests in flight at once")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--share", type=float, default=0.1, help="calibrate the threshold for this LLM share")
    p.add_argument("--threshold", type=float, default=None, help="use this threshold instead of calibrating")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "ab"))
    args = p.parse_args(argv)
    known = [*MODE_THRESHOLDS, ASSISTED, ASSISTED_FULL]
    unknown = set(args.modes) - set(known)
    if unknown:
        p.error(f"--modes: unknown {', '.join(sorted(unknown))} (choose from {', '.join(known)})")
    if {ASSISTED, ASSISTED_FULL} & set(args.modes) and args.sessions != 1:
        p.error("--modes assisted runs one request at a time (HF assisted generation assists one sequence); "
                "use --sessions 1")
    return args


if __name__ == "__main__":
    sys.exit(main())
