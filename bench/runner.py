"""The service side of the harness: one deployment with a coordinator per router strategy, threshold
calibration for target LLM shares, and request runs (one pass over prompts, or a concurrency level).

All strategies share the same SLM and LLM worker processes: each gets its own router and coordinator,
so switching strategy never reloads a model and every run sees the same warm workers.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field

from rich.progress import Progress

STOP = ["\n```\n"]  # end of the answer's code block: the prose after it is not graded, so don't pay for it


@dataclass
class Request:
    key: str                      # task id or prompt index
    messages: list[dict]


@dataclass
class Outcome:
    key: str
    text: str
    sources: list[str]
    probabilities: list[float]
    prompt_tokens: int
    completion_tokens: int
    llm_share: float
    ttft_s: float
    total_s: float
    tokens_per_s: float
    finish: str
    rollbacks: int = 0  # verify mode
    load_llm_only_tokens: int = 0  # --llm-only-above-sessions: tokens the LLM wrote alone because of the load

    @property
    def itl_s(self) -> float:
        """Mean inter-token latency after the first token."""
        return (self.total_s - self.ttft_s) / (self.completion_tokens - 1) if self.completion_tokens > 1 else 0.0


@dataclass
class RunResult:
    outcomes: list[Outcome]
    wall_s: float
    sessions: int

    def median(self, attr: str) -> float:
        values = [getattr(o, attr) for o in self.outcomes if o.completion_tokens > 0]
        return statistics.median(values) if values else 0.0

    @property
    def aggregate_tokens_per_s(self) -> float:
        return sum(o.completion_tokens for o in self.outcomes) / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def llm_share(self) -> float:
        """Token-weighted share of the whole run (not a median of per-request shares)."""
        total = sum(o.completion_tokens for o in self.outcomes)
        return sum(o.sources.count("llm") for o in self.outcomes) / total if total else 0.0


@dataclass
class Services:
    """A running local deployment: coordinator address per strategy name."""

    cluster: object
    coordinators: dict[str, str] = field(default_factory=dict)
    slm: str = ""
    llm: str = ""

    def stop(self) -> None:
        self.cluster.stop()


def start_services(slm: str, llm: str, *, device: str, slm_dtype: str, llm_dtype: str, strategies: dict[str, str | None],
                   threads: int = 0, log_dir: str | None = None, max_sessions: int = 64,
                   variants: dict[str, list[str]] | None = None,
                   slm_quantize: str = "none", llm_quantize: str = "none", worker_args: list[str] = (),
                   slm_draft_vocab: int = 0,
                   say=print) -> Services:
    """Workers once, then a router + coordinator per strategy ({name: checkpoint or None}); for each of
    `variants` ({variant: extra coordinator flags}), one more for the first strategy ("<name>+<variant>"):
    the same router and workers, only the coordinator's scheduling differs."""
    from r2r_serve.launcher import LocalCluster, start_deployment, start_router_and_coordinator

    cluster = LocalCluster(log_dir)
    say(f"service logs: {cluster.log_dir}")
    names = list(strategies)
    first = names[0]
    limit = ["--max-concurrent-sessions", str(max_sessions)]
    d = start_deployment(cluster, slm=slm, llm=llm, slm_dtype=slm_dtype, llm_dtype=llm_dtype, device=device,
                         threads=threads, slm_quantize=slm_quantize, llm_quantize=llm_quantize,
                         router_strategy=first, router_checkpoint=strategies[first],
                         coordinator_args=limit, worker_args=worker_args, slm_draft_vocab=slm_draft_vocab,
                         say=lambda *a, **k: None)
    services = Services(cluster, {first: d.coordinator}, d.slm, d.llm)
    for name in names[1:]:
        _, services.coordinators[name] = start_router_and_coordinator(
            cluster, d.slm, d.llm, router_strategy=name, router_checkpoint=strategies[name],
            coordinator_args=limit, suffix=f"-{name}")
    for variant, flags in (variants or {}).items():
        _, services.coordinators[f"{first}+{variant}"] = start_router_and_coordinator(
            cluster, d.slm, d.llm, router_strategy=first, router_checkpoint=strategies[first],
            coordinator_args=[*limit, *flags], suffix=f"-{variant}")
    return services


async def _one(client, req: Request, threshold: float, max_tokens: int, stop: list[str], verify: dict) -> Outcome:
    r = await client.generate(req.messages, max_tokens=max_tokens, threshold=threshold, stop=stop, **verify)
    s = r.stats
    return Outcome(key=req.key, text=r.text, sources=r.sources,
                   probabilities=[t.router_probability if t.router_probability is not None else -1.0 for t in r.tokens],
                   prompt_tokens=s.prompt_tokens, completion_tokens=s.completion_tokens, llm_share=s.llm_share,
                   ttft_s=s.time_to_first_token_s, total_s=s.total_s, tokens_per_s=s.tokens_per_s,
                   finish=s.finish_reason, rollbacks=s.rollbacks, load_llm_only_tokens=s.load_llm_only_tokens)


async def _run(target: str, requests: list[Request], threshold: float, max_tokens: int, sessions: int,
               stop: list[str], progress: Progress | None, label: str, verify: dict) -> RunResult:
    """Keep `sessions` requests in flight until all are done (a closed loop, like a fixed pool of users)."""
    from r2r_client import AsyncR2RClient

    queue: asyncio.Queue[Request] = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    outcomes: list[Outcome] = []
    task = progress.add_task(label, total=len(requests)) if progress else None

    async def user(client):
        while not queue.empty():
            req = queue.get_nowait()
            outcomes.append(await _one(client, req, threshold, max_tokens, stop, verify))
            if progress:
                progress.advance(task)

    async with AsyncR2RClient(target, wait_for_ready=True) as client:
        start = time.perf_counter()
        await asyncio.gather(*(user(client) for _ in range(min(sessions, len(requests)))))
        wall = time.perf_counter() - start
    order = {r.key: i for i, r in enumerate(requests)}
    outcomes.sort(key=lambda o: order[o.key])
    return RunResult(outcomes, wall, sessions)


def run_requests(target: str, requests: list[Request], *, threshold: float, max_tokens: int, sessions: int = 1,
                 stop: list[str] | None = None, progress: Progress | None = None, label: str = "",
                 rollback_below: float | None = None, max_draft_tokens: int | None = None,
                 min_draft_probability: float | None = None) -> RunResult:
    """`rollback_below`: verify mode (coordinator.proto's GenerateRequest.rollback_below); None = off.
    `max_draft_tokens`, `min_draft_probability`: its draft length and draft stop; None = the coordinator's."""
    verify = dict(rollback_below=rollback_below, max_draft_tokens=max_draft_tokens,
                  min_draft_probability=min_draft_probability)
    return asyncio.run(_run(target, requests, threshold, max_tokens, sessions, STOP if stop is None else stop,
                            progress, label, verify))


async def _forward_s(endpoints: list[str]) -> dict[str, float]:
    import grpc

    from r2r_serve.proto import worker_pb2, worker_pb2_grpc

    total = dict.fromkeys(("forward", "prefill", "decode"), 0.0)
    batches = 0
    for ep in endpoints:
        async with grpc.aio.insecure_channel(ep) as channel:
            load = await worker_pb2_grpc.ModelWorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=10.0)
            for kind in total:
                total[kind] += getattr(load, f"{kind}_s")
            batches += load.batches
    return total | {"batches": batches}


def workers_forward_s(services: Services) -> dict[str, dict[str, float]]:
    """Seconds each pool's workers have spent in forward passes so far, in all and by kind, and how many
    forwards (batches) they ran, summed over replicas: {"slm": {"forward": s, "prefill": s, "decode": s,
    "batches": n}, "llm": {...}}."""
    return {role: asyncio.run(_forward_s([e for e in endpoints.split(",") if e]))
            for role, endpoints in (("slm", services.slm), ("llm", services.llm))}


def timed_run(services: Services, target: str, requests: list[Request], **kw) -> tuple[RunResult, dict]:
    """run_requests, plus the workers' forward seconds during it and the share of its wall time they are:
    1 - that share is the service overhead, measured in the same minutes as the run (no drift between a
    run and a component timing taken later, which on a noisy VM can be larger than the overhead itself)."""
    before = workers_forward_s(services)
    result = run_requests(target, requests, **kw)
    after = workers_forward_s(services)
    busy = {f"{role}_s": round(after[role]["forward"] - before[role]["forward"], 3) for role in after}
    share = sum(busy.values()) / result.wall_s if result.wall_s > 0 else None
    kinds = {}
    for role in after:
        spent = {k: after[role][k] - before[role][k] for k in after[role]}
        kinds[role] = {"prefill_s": round(spent["prefill"], 3), "decode_s": round(spent["decode"], 3),
                       "extend_s": round(spent["forward"] - spent["prefill"] - spent["decode"], 3)}
    return result, dict(busy, wall_s=round(result.wall_s, 3), workers_share=share, by_kind=kinds)


def warm_up(target: str, thresholds: list[float]) -> None:
    """One short request per threshold: first-call costs (allocations, stream set-up) are not measured."""
    msgs = [{"role": "user", "content": "Say hi."}]
    for t in thresholds:
        run_requests(target, [Request("warm-up", msgs)], threshold=t, max_tokens=4)


def calibrate_thresholds(target: str, requests: list[Request], shares: list[float], *, max_tokens: int,
                         sessions: int, progress: Progress | None = None, label: str = "") -> dict:
    """Thresholds that route each target share of the SLM's own path.

    At threshold 1.0 the router scores every token but (P < 1) routes none, so one pass gives the score
    distribution along the SLM's greedy path; the (1 - share) quantile routes `share` of those positions.
    The realized share under routing differs a little (routed tokens change the path): runs report it."""
    run = run_requests(target, requests, threshold=1.0, max_tokens=max_tokens, sessions=sessions, progress=progress,
                       label=label)
    scores = sorted(p for o in run.outcomes for p in o.probabilities if p >= 0)
    if not scores:
        raise RuntimeError("calibration saw no router scores: is the router reachable?")
    out = {}
    for share in shares:
        idx = min(len(scores) - 1, max(0, int(round((1.0 - share) * len(scores)))))
        out[share] = float(scores[idx])
    return {"thresholds": out, "positions": len(scores)}
