"""Where the time of a lossless answer goes: HF assisted generation vs the services' verify mode.

    python -m bench.spec_breakdown [--problems 3] [--router top1] [--thresholds 2,0.6] [--verify 1:16,1:8]

For each problem, HF assisted generation (in this process, its two models' forwards timed by wrappers)
and each verify-mode entry (through the services; the workers' own forward counts and seconds read from
GetLoad before and after) answer the same prompt greedily. Per entry, summed over the problems:
tokens, SLM forwards and seconds, LLM forwards and seconds (and tokens fed to the LLM), and the rest of
the wall time. Both are lossless, so the answers must match; the gap between them is in these columns:
more SLM forwards (tokens drafted and thrown away), more or longer LLM forwards, or time outside both.
Writes bench/results/spec_breakdown-<date>.json.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass

from bench import assisted, humaneval, runner
from bench.ab import load_assisted, parse_verify, verify_name, verify_params
from bench.args import add_pair_args, resolve_pair
from bench.machine import write_stamped


@dataclass
class Spent:
    tokens: int = 0
    wall_s: float = 0.0
    slm_forwards: int = 0
    slm_s: float = 0.0
    llm_forwards: int = 0
    llm_s: float = 0.0
    llm_fed_tokens: int = 0   # assisted only: tokens its LLM forwards took in (the workers do not report it)
    llm_written: int = 0      # tokens of the answers the LLM wrote (assisted: all of them)
    rollbacks: int = 0

    @property
    def other_s(self) -> float:
        return self.wall_s - self.slm_s - self.llm_s

    def row(self) -> dict:
        return asdict(self) | {"other_s": self.other_s,
                               "tokens_per_s": self.tokens / self.wall_s if self.wall_s else 0.0}


class TimedForward:
    """Wraps a model's forward: calls, seconds and input tokens (the model runs synchronously on the CPU)."""

    def __init__(self, model):
        self.model, self.inner = model, model.forward
        self.calls, self.seconds, self.tokens = 0, 0.0, 0
        model.forward = self

    def __call__(self, *args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        started = time.perf_counter()
        out = self.inner(*args, **kwargs)
        self.seconds += time.perf_counter() - started
        self.calls += 1
        self.tokens += 0 if ids is None else ids.shape[-1]
        return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pair_args(p)
    p.add_argument("--problems", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--router", default="top1", choices=["top1", "entropy", "neural"],
                   help="the router strategy (top1: P = 1 - the SLM's top-1 probability; threshold 0.6 ends drafts "
                   "where HF's default assistant_confidence_threshold 0.4 does; neural: the pair's shipped router)")
    p.add_argument("--plain", default="", help="also plain R2R (no verify mode, lossy) at these router thresholds, "
                   "comma-separated: entries r2r@T")
    p.add_argument("--thresholds", default="2", help="router thresholds of the verify entries, comma-separated "
                   "(2 = the router never routes: drafts end only at the draft length)")
    p.add_argument("--no-lookahead", action="store_true",
                   help="also run every verify entry through a coordinator with --no-lookahead (name suffix "
                   "+nolookahead): at a route the SLM's next step then waits for the LLM instead of sharing the CPU")
    p.add_argument("--verify", type=parse_verify, default=parse_verify("1:16,1:8"), help="P:D entries, as bench.ab's")
    p.add_argument("--out", default="bench/results")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    slm, llm = resolve_pair(args)
    problems = humaneval.load_problems(args.problems)
    requests = [runner.Request(p.task_id, humaneval.chat_messages(p)) for p in problems]
    checkpoint = None
    if args.router == "neural":
        from r2r_serve.models.pair_config import load_pair_config

        checkpoint = load_pair_config().router_checkpoint
        if checkpoint is None:
            raise SystemExit("--router neural: the prepared pair ships no router checkpoint")
    services = runner.start_services(slm, llm, device=args.device, slm_dtype=args.slm_dtype, llm_dtype=args.llm_dtype,
                                     strategies={args.router: checkpoint}, threads=args.threads,
                                     slm_draft_vocab=args.slm_draft_vocab,
                                     variants={"nolookahead": ["--no-lookahead"]} if args.no_lookahead else None)
    thresholds = [float(t) for t in args.thresholds.split(",") if t]
    coordinators = {"": args.router} | ({"+nolookahead": f"{args.router}+nolookahead"} if args.no_lookahead else {})
    entries = {f"{verify_name(*spec)}@{t:g}{suffix}": (spec, t, coordinator)
               for suffix, coordinator in coordinators.items() for t in thresholds for spec in args.verify}
    entries |= {f"r2r@{float(t):g}{suffix}": (None, float(t), coordinator)
                for suffix, coordinator in coordinators.items() for t in args.plain.split(",") if t}
    spent = {"assisted": Spent(), **{name: Spent() for name in entries}}
    texts: dict[str, list[str]] = {name: [] for name in spent}
    try:
        for target in services.coordinators.values():
            runner.warm_up(target, [2.0, 0.0])
        pair = load_assisted(args, slm, llm, requests[0])
        slm_fwd, llm_fwd = TimedForward(pair.slm), TimedForward(pair.llm)
        for i, req in enumerate(requests):
            before = (slm_fwd.calls, slm_fwd.seconds, llm_fwd.calls, llm_fwd.seconds, llm_fwd.tokens)
            res = assisted.generate(pair, req.messages, args.max_tokens, "assisted", stop=runner.STOP)
            s = spent["assisted"]
            s.tokens += res.completion_tokens
            s.wall_s += res.total_s
            s.slm_forwards += slm_fwd.calls - before[0]
            s.slm_s += slm_fwd.seconds - before[1]
            s.llm_forwards += llm_fwd.calls - before[2]
            s.llm_s += llm_fwd.seconds - before[3]
            s.llm_fed_tokens += llm_fwd.tokens - before[4]
            s.llm_written += res.completion_tokens
            texts["assisted"].append(res.text)
            for name, (spec, t, coordinator) in entries.items():
                before_load = runner.workers_forward_s(services)
                run = runner.run_requests(services.coordinators[coordinator], [req], threshold=t, max_tokens=args.max_tokens,
                                          **verify_params(spec))
                after_load = runner.workers_forward_s(services)
                o = run.outcomes[0]
                s = spent[name]
                s.tokens += o.completion_tokens
                s.wall_s += o.total_s
                s.slm_forwards += after_load["slm"]["batches"] - before_load["slm"]["batches"]
                s.slm_s += after_load["slm"]["forward"] - before_load["slm"]["forward"]
                s.llm_forwards += after_load["llm"]["batches"] - before_load["llm"]["batches"]
                s.llm_s += after_load["llm"]["forward"] - before_load["llm"]["forward"]
                s.rollbacks += o.rollbacks
                s.llm_written += o.sources.count("llm")
                texts[name].append(o.text)
            print(f"problem {i + 1}/{len(requests)} done", flush=True)
    finally:
        services.stop()
    rows = {name: s.row() for name, s in spent.items()}
    header = f"{'entry':36s} {'tok':>5s} {'wall s':>7s} {'tok/s':>6s} {'SLM fw':>6s} {'SLM s':>6s} " \
             f"{'LLM fw':>6s} {'LLM s':>6s} {'other s':>7s} {'rollb':>5s} {'LLM tok':>7s}"
    print(header)
    for name, r in rows.items():
        print(f"{name:36s} {r['tokens']:5d} {r['wall_s']:7.2f} {r['tokens_per_s']:6.2f} {r['slm_forwards']:6d} "
              f"{r['slm_s']:6.2f} {r['llm_forwards']:6d} {r['llm_s']:6.2f} {r['other_s']:7.2f} {r['rollbacks']:5d} "
              f"{r['llm_written']:7d}")
    # Assisted generation is the LLM's own answer; lossy plain R2R entries may differ on some problems.
    same = {name: sum(a == b for a, b in zip(texts[name], texts["assisted"])) / len(requests) for name in texts}
    print("answers equal to assisted's:", same)
    path = write_stamped(args.out, "spec_breakdown", dict(
        router=args.router, problems=args.problems, max_tokens=args.max_tokens, slm_dtype=args.slm_dtype,
        llm_dtype=args.llm_dtype, entries=rows, same_answer_as_assisted=same), args.device)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
