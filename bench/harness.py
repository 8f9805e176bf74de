"""The evaluation harness: quality (HumanEval pass@1) and speed of R2R against every baseline, in one run.

    python bench/harness.py --limit 10                 # a quick run on the default pair
    python bench/harness.py                            # all 164 problems (the README table)
    python bench/harness.py --device cuda              # on a GPU, bf16
    python bench/harness.py --tiny /tmp/tiny --limit 3 # tiny random models: a smoke run of every stage

What one run does, on one machine:
1. Starts the SLM and LLM workers once, and a router + coordinator per router strategy (the shipped neural
   router, the entropy baseline, and a seeded random router: the random switching the R2R reference code offers).
2. Calibrates each strategy's threshold for each target LLM share (--shares): the score quantile along the
   SLM's own answers to the first --calibration-prompts problems (no correctness information is used; the
   scores of a threshold-1.0 pass, which scores every token and routes none). So every router is compared at
   the same share of this workload. `--calibration-set train` uses our training prompt set instead.
3. Quality: every run answers the problems (chat prompt, greedy, up to --max-tokens, stopping at the end
   of the code block) and the answers are checked by the official HumanEval tests in a sandboxed subprocess.
   Runs: SLM alone, LLM alone, R2R with each router at each share, HF assisted generation (in-process).
4. Speed: tokens/s per request, TTFT and inter-token latency at one session (the first --speed-problems
   answers, or all of them when quality ran at one session), and a concurrency sweep (--sweep) of
   aggregate tokens/s.
5. Ideal bound: after stopping the services, times the components in-process (SLM prefill and step, LLM
   forward of k tokens, router compute) and replays each answer's provenance to get its cost with zero
   service overhead; reports measured / ideal and where the time goes.
Writes bench/results/summary.json (schema in the README), summary.md, and two PNG plots.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench.*` importable when run as a script

from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402

from bench import components as comp  # noqa: E402
from bench import answers, humaneval, report, runner  # noqa: E402
from bench.args import add_pair_args, resolve_auto_dtypes  # noqa: E402
from bench.machine import machine_description, software_versions  # noqa: E402

console = Console()
STRATEGY_RUN_NAMES = {"neural": "r2r", "entropy": "r2r-entropy", "random": "r2r-random"}
VARIANT = "+"  # "<strategy>+<variant>": a coordinator over the first strategy's router with other scheduling


def new_progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)


def calibration_requests(n: int, workload: list[runner.Request], which: str) -> list[runner.Request]:
    """`workload`: the first n requests of the run itself. `train`: the end of our training prompt set
    (programming tasks from the stdlib). Score distributions differ between the two (HumanEval answers
    are more confident code), so only the first gives the shares the runs are meant to have."""
    if which == "workload":
        return workload[:n]
    from r2r_serve.training.prompts import build_prompts

    prompts = build_prompts()[-n:]
    return [runner.Request(f"cal-{p['id']}", [{"role": "user", "content": p["text"]}]) for p in prompts]


def coordinator_variants(args) -> dict[str, list[str]]:
    """Scheduling variants measured beside the plain coordinator: {variant: its extra flags}."""
    variants = {}
    if args.prefetch_min_tokens > 0:
        variants["prefetch"] = ["--llm-prefetch-min-tokens", str(args.prefetch_min_tokens)]
    if args.compare_lookahead:
        variants["nolookahead"] = ["--no-lookahead"]
    return variants


def sweep_only_variants(args) -> dict[str, list[str]]:
    """Variants that differ from the plain coordinator only under concurrency: measured in the sweep alone
    (at one session they would repeat the plain run)."""
    if args.llm_only_above_sessions is None:
        return {}
    return {f"adaptive{args.llm_only_above_sessions}": ["--llm-only-above-sessions", str(args.llm_only_above_sessions)]}


def plan_runs(thresholds: dict[str, dict[float, float]], shares: list[float], variants=(),
              baseline_shares: list[float] | None = None, rollbacks: list[float] = ()) -> list[dict]:
    """The first strategy (the shipped router) at every share, the others (baseline routers) at every
    `baseline_shares` (default: the same shares); for each of `variants`, the first strategy also at the first
    share with that coordinator variant (same router, same threshold: only the coordinator's scheduling differs);
    for each of `rollbacks`, the first strategy at the first share in verify mode (a request parameter:
    the same coordinator, router and threshold)."""
    runs = [dict(name="slm", strategy=None, threshold=2.0, target_share=0.0),
            dict(name="llm", strategy=None, threshold=0.0, target_share=1.0)]
    for i, (strategy, by_share) in enumerate(thresholds.items()):
        for share in shares if i == 0 or baseline_shares is None else baseline_shares:
            runs.append(dict(name=STRATEGY_RUN_NAMES[strategy], strategy=strategy, threshold=by_share[share],
                             target_share=share))
        if i == 0:  # verify mode right after the plain runs it is measured against
            for below in rollbacks:
                runs.append(dict(name=f"{STRATEGY_RUN_NAMES[strategy]}-verify-{below:g}", strategy=strategy,
                                 threshold=by_share[shares[0]], target_share=shares[0], rollback_below=below))
    if thresholds:
        strategy, by_share = next(iter(thresholds.items()))
        for variant in variants:
            runs.append(dict(name=f"{STRATEGY_RUN_NAMES[strategy]}-{variant}", strategy=f"{strategy}{VARIANT}{variant}",
                             threshold=by_share[shares[0]], target_share=shares[0]))
    return runs


def service_phase(args, slm: str, llm: str, problems, strategies: dict[str, str | None]) -> dict:
    requests = [runner.Request(p.task_id, humaneval.chat_messages(p)) for p in problems]
    speed_requests = requests if args.quality_sessions == 1 else requests[: args.speed_problems]
    variants, sweep_variants = coordinator_variants(args), sweep_only_variants(args)
    services = runner.start_services(slm, llm, device=args.device, slm_dtype=args.slm_dtype, llm_dtype=args.llm_dtype,
                                     strategies=strategies, threads=args.threads, log_dir=args.log_dir,
                                     variants=variants | sweep_variants, slm_quantize=args.slm_quantize,
                                     llm_quantize=args.llm_quantize, slm_draft_vocab=args.slm_draft_vocab,
                                     say=console.print,
                                     worker_args=["--forward-fixed-rows", str(args.forward_fixed_rows)]
                                     if args.forward_fixed_rows else [])
    out: dict = {"calibration": {}, "runs": [], "sweep": []}
    try:
        with new_progress() as progress:
            for name, target in services.coordinators.items():
                runner.warm_up(target, [2.0, 0.0, 0.5])
            cal = calibration_requests(args.calibration_prompts, requests, args.calibration_set)
            thresholds = {}
            for name, target in services.coordinators.items():
                if VARIANT in name:
                    continue  # the same router as its strategy's: the same thresholds
                shares = sorted(set(args.shares) | set(args.baseline_shares or []))
                cal_keys, cal_tokens = [r.key for r in cal], args.calibration_max_tokens or args.max_tokens
                c = answers.load_calibration(args.out, name, shares, cal_keys, cal_tokens) if args.resume else None
                if c is None:
                    c = runner.calibrate_thresholds(target, cal, shares, max_tokens=cal_tokens,
                                                    sessions=max(args.quality_sessions, 8), progress=progress,
                                                    label=f"calibrate {name}")
                    answers.save_calibration(args.out, name, c, cal_keys, cal_tokens)
                else:
                    console.print(f"calibration of {name}: resumed from {args.out}/answers")
                thresholds[name] = c["thresholds"]
                out["calibration"][name] = {f"{s:g}": t for s, t in c["thresholds"].items()} | {"positions": c["positions"]}
            first = next(iter(services.coordinators))
            for plan in plan_runs(thresholds, args.shares, variants, args.baseline_shares, args.rollback_below):
                target = services.coordinators[plan["strategy"] or first]
                label = f"{plan['name']} share {plan['target_share']:g}"
                keys = [r.key for r in requests]
                quality = None
                if args.resume:
                    quality = answers.load_run(args.out, plan, keys, args.max_tokens, args.device)
                if quality is None:
                    quality = runner.run_requests(target, requests, threshold=plan["threshold"],
                                                  max_tokens=args.max_tokens, sessions=args.quality_sessions,
                                                  progress=progress, label=label,
                                                  rollback_below=plan.get("rollback_below"))
                    answers.save_run(args.out, plan, quality, args.max_tokens, args.device)
                else:
                    console.print(f"{label}: resumed from {answers.run_path(args.out, plan)}")
                one_session = args.quality_sessions == 1 or args.quality_only
                speed, workers = (quality, None) if one_session else runner.timed_run(
                    services, target, speed_requests, threshold=plan["threshold"], max_tokens=args.max_tokens,
                    rollback_below=plan.get("rollback_below"),
                    sessions=1, progress=progress, label=f"{label} (speed, 1 session)")
                out["runs"].append(dict(plan, quality=quality, speed=speed, workers=workers))
            sweep_plans = [p for p in plan_runs(thresholds, args.shares[:1], variants) if p["name"] in args.sweep_runs]
            sweep_plans += [p for p in plan_runs(thresholds, args.shares[:1], sweep_variants)
                            if VARIANT in (p["strategy"] or "")]
            if args.quality_only or not args.sweep:
                sweep_plans = []
            sweep_prompts = requests[: max(args.sweep, default=0) * args.sweep_rounds]
            for plan in sweep_plans:
                for sessions in args.sweep:
                    target = services.coordinators[plan["strategy"] or first]
                    r, workers = runner.timed_run(services, target, sweep_prompts[: sessions * args.sweep_rounds],
                                                  threshold=plan["threshold"], max_tokens=args.sweep_max_tokens,
                                                  sessions=sessions, progress=progress,
                                                  label=f"sweep {plan['name']} x{sessions}")
                    out["sweep"].append(dict(plan, sessions=sessions, result=r, workers=workers))
    finally:
        services.stop()
    return out


def assisted_phase(args, slm: str, llm: str, problems) -> runner.RunResult | None:
    if args.skip_assisted or args.quality_only:
        return None
    from bench import assisted

    pair = assisted.load_pair(slm, llm, device=args.device, slm_dtype=args.slm_dtype, llm_dtype=args.llm_dtype,
                              threads=args.threads, slm_quantize=args.slm_quantize, llm_quantize=args.llm_quantize,
                              slm_draft_vocab=args.slm_draft_vocab)
    requests = [runner.Request(p.task_id, humaneval.chat_messages(p)) for p in problems[: args.speed_problems]]
    with new_progress() as progress:
        result = assisted.run_requests(pair, requests, args.max_tokens, stop=runner.STOP, progress=progress)
    del pair
    return result


def ideal_report(result: runner.RunResult, mode: str, components: comp.Components) -> dict:
    """measured / ideal per request (ideal time / measured time, so 1.0 = no overhead) and the summed parts."""
    ratios, parts = [], {"slm_s": 0.0, "router_s": 0.0, "llm_s": 0.0, "total_s": 0.0, "measured_s": 0.0}
    for o in result.outcomes:
        if o.completion_tokens == 0 or o.total_s <= 0:
            continue
        ideal = comp.ideal_seconds(o.sources, o.prompt_tokens, components, mode)
        ratios.append(ideal["total_s"] / o.total_s)
        for k, v in ideal.items():
            parts[k] += v
        parts["measured_s"] += o.total_s
    parts["overhead_s"] = parts["measured_s"] - parts["total_s"]
    return {"measured_over_ideal": statistics.median(ratios) if ratios else None,
            "breakdown": {k: round(v, 3) for k, v in parts.items()}}


def grade(problems, result: runner.RunResult, workers: int) -> dict:
    by_id = {p.task_id: p for p in problems}
    chosen = [by_id[o.key] for o in result.outcomes]
    return humaneval.evaluate(chosen, {o.key: o.text for o in result.outcomes}, workers=workers, progress=False)


def run_entry(name, threshold, sessions, speed: runner.RunResult, quality: runner.RunResult | None, graded: dict | None,
              **extra) -> dict:
    return dict(name=name, threshold=threshold, sessions=sessions, tokens_per_s=speed.median("tokens_per_s"),
                aggregate_tokens_per_s=(quality or speed).aggregate_tokens_per_s,
                llm_share=(quality or speed).llm_share, humaneval_pass1=graded["pass@1"] if graded else None,
                problems=graded["problems"] if graded else len(speed.outcomes),
                passed_tasks=sorted(k for k, v in graded["results"].items() if v["passed"]) if graded else None,
                ttft_s=speed.median("ttft_s"), itl_ms=1000 * speed.median("itl_s"),
                completion_tokens=statistics.median(o.completion_tokens for o in (quality or speed).outcomes), **extra)


def paired_differences(runs: list[dict]) -> dict:
    """Per run, against the LLM alone on the same problems: problems only the LLM passes, and problems only
    this run passes. pass@1 differences of a few points on a few dozen problems are a handful of problems;
    this says which way each one went."""
    llm = next((r for r in runs if r["name"] == "llm" and r.get("passed_tasks") is not None), None)
    if llm is None:
        return {}
    reference = set(llm["passed_tasks"])
    return {r["name"] + (f"@{r['threshold']:.3g}" if r["threshold"] is not None else ""):
            {"only_llm_passes": sorted(reference - set(r["passed_tasks"])),
             "only_this_passes": sorted(set(r["passed_tasks"]) - reference)}
            for r in runs if r is not llm and r.get("passed_tasks") is not None and r["problems"] == llm["problems"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from r2r_serve.cli import resolve_models
    from r2r_serve.models.pair_config import load_pair_config

    slm, llm, _ = resolve_models(args)
    problems = humaneval.load_problems(args.limit)
    checkpoint = args.router_checkpoint
    if checkpoint == "default":
        checkpoint = None if args.tiny else load_pair_config().router_checkpoint
    strategies = {"neural": checkpoint} if checkpoint else {}
    strategies |= {s: None for s in ("entropy", "random") if s in args.baselines}
    console.print(f"[bold]{len(problems)} HumanEval problems[/]; SLM {slm}, LLM {llm} on {args.device} "
                  f"(SLM {args.slm_dtype}, LLM {args.llm_dtype}); routers: {', '.join(strategies)}")
    started = time.perf_counter()
    served = service_phase(args, slm, llm, problems, strategies)
    assisted_result = assisted_phase(args, slm, llm, problems)

    from r2r_serve.router.strategies import load_strategy

    components = None
    if not args.quality_only:
        router = load_strategy("neural", checkpoint) if checkpoint else load_strategy("entropy")
        components = comp.measure(slm, llm, device=args.device, slm_dtype=args.slm_dtype, llm_dtype=args.llm_dtype,
                                  slm_quantize=args.slm_quantize, llm_quantize=args.llm_quantize, strategy=router,
                                  context=args.component_context, max_prefill=args.component_max_tokens,
                                  repeats=args.component_repeats, say=console.print)
    speed_sessions = args.quality_sessions if args.quality_only else 1

    runs = []
    for r in served["runs"]:
        graded = grade(problems, r["quality"], args.grade_workers)
        mode = "r2r" if r["strategy"] else r["name"]
        # The ideal bound replays provenance; verify mode's rollbacks and tail passes are not in it.
        ideal = ideal_report(r["speed"], mode, components) if components and not r.get("rollback_below") else {}
        workers = r["workers"]
        runs.append(run_entry(r["name"], r["threshold"], speed_sessions, r["speed"], r["quality"], graded,
                              target_share=r["target_share"], router=r["strategy"], quality_sessions=args.quality_sessions,
                              rollback_below=r.get("rollback_below"),
                              rollbacks=sum(o.rollbacks for o in r["quality"].outcomes),
                              workers_forward=workers,
                              service_overhead=1 - workers["workers_share"] if workers else None, **ideal))
    if assisted_result:
        graded = grade(problems, assisted_result, args.grade_workers)
        runs.append(run_entry("assisted", None, 1, assisted_result, None, graded, router=None))
    for s in served["sweep"]:
        res = s["result"]
        runs.append(run_entry(s["name"], s["threshold"], s["sessions"], res, None, None, sweep=True,
                              workers_forward=s["workers"],
                              target_share=s["target_share"], router=s["strategy"]))
    primary = "r2r" if checkpoint else STRATEGY_RUN_NAMES.get(next(iter(strategies), ""), "r2r")
    neural = [r for r in runs if r["name"] == primary and r.get("measured_over_ideal") and not r.get("sweep")]
    summary = dict(machine=machine_description(args.device), device=args.device, versions=software_versions(),
                   date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                   model_pair=f"{Path(slm).name} + {Path(llm).name}", slm_dtype=args.slm_dtype, llm_dtype=args.llm_dtype,
                   slm_quantize=args.slm_quantize, llm_quantize=args.llm_quantize, max_tokens=args.max_tokens, runs=runs,
                   r2r_measured_over_ideal=statistics.median(r["measured_over_ideal"] for r in neural) if neural else None,
                   r2r_service_overhead=next((r["service_overhead"] for r in neural), None),
                   calibration=served["calibration"], components=components.to_json() if components else None,
                   quality_only=args.quality_only, paired=paired_differences(runs),
                   command=" ".join(["python bench/harness.py", *(argv if argv is not None else sys.argv[1:])]),
                   wall_s=round(time.perf_counter() - started, 1))
    report.print_table(summary, console)
    report.write(summary, Path(args.out), console)
    return 0


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pair_args(p, "auto")
    p.add_argument("--router-checkpoint", default="default",
                   help="neural router checkpoint (default: the shipped one for the default pair; '' = no neural router)")
    p.add_argument("--baselines", default="entropy,random", help="baseline routers to compare")
    p.add_argument("--limit", type=int, default=None, help="first N HumanEval problems (default: all 164)")
    p.add_argument("--shares", type=_floats, default=[0.1, 0.2], help="target LLM shares, e.g. 0.05,0.1,0.2")
    p.add_argument("--baseline-shares", type=_floats, default=None,
                   help="the baseline routers' target shares (default: --shares), to run them at fewer points")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--quality-sessions", type=int, default=1,
                   help="concurrent sessions for the quality pass (>1: faster, and speed is measured separately)")
    p.add_argument("--speed-problems", type=int, default=8, help="answers timed at 1 session (and by assisted)")
    p.add_argument("--calibration-prompts", type=int, default=16)
    p.add_argument("--calibration-max-tokens", type=int, default=0, help="0 = --max-tokens")
    p.add_argument("--calibration-set", choices=["workload", "train"], default="workload")
    p.add_argument("--sweep", type=_ints, default=[1, 2, 4, 8], help="concurrency levels")
    p.add_argument("--sweep-runs", default="r2r,llm,slm", help="which runs the sweep covers")
    p.add_argument("--sweep-rounds", type=int, default=2, help="requests per session in the sweep")
    p.add_argument("--sweep-max-tokens", type=int, default=128)
    p.add_argument("--prefetch-min-tokens", type=int, default=16, metavar="N",
                   help="also run the shipped router at the first share with eager LLM catch-up of lags >= N "
                        "(the coordinator's --llm-prefetch-min-tokens) as run r2r-prefetch; 0 = skip")
    p.add_argument("--compare-lookahead", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the shipped router at the first share with the coordinator's --no-lookahead "
                        "(run r2r-nolookahead): what sending each next extend early buys")
    p.add_argument("--rollback-below", type=_floats, default=[0.1], metavar="P[,P...]",
                   help="also run the shipped router at the first share in verify mode with each of these "
                        "rollback_below values (run r2r-verify-P: the LLM rolls back SLM tokens it gives P < this); "
                        "'' = skip")
    p.add_argument("--forward-fixed-rows", type=int, default=0,
                   help="the workers' --forward-fixed-rows (0 = their default; a huge value never splits a batch: "
                        "every row padded to the longest chunk, as before the split existed)")
    p.add_argument("--llm-only-above-sessions", type=int, default=None, metavar="N",
                   help="also sweep R2R with the coordinator's --llm-only-above-sessions N (run r2r-adaptiveN): "
                        "above N active requests the LLM writes alone")
    p.add_argument("--skip-assisted", action="store_true")
    p.add_argument("--quality-only", action="store_true",
                   help="answers and grades only, at --quality-sessions: no 1-session timing, sweep, assisted "
                        "generation or component timing (tok/s then comes from the concurrent quality runs)")
    p.add_argument("--resume", action="store_true",
                   help="reuse the calibration and the runs already saved under <out>/answers/ when they are the "
                        "same runs (router, threshold, share, problems, --max-tokens); run only what is missing")
    p.add_argument("--component-context", type=int, default=256)
    p.add_argument("--component-max-tokens", type=int, default=512)
    p.add_argument("--component-repeats", type=int, default=5)
    p.add_argument("--grade-workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--log-dir")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    resolve_auto_dtypes(args)
    args.baselines = [b for b in args.baselines.split(",") if b]
    args.sweep_runs = [r for r in args.sweep_runs.split(",") if r]
    args.router_checkpoint = args.router_checkpoint or None
    return args


if __name__ == "__main__":
    sys.exit(main())
