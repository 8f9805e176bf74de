"""Component timings and the ideal bound: what R2R would cost with zero service overhead.

Timed in-process with plain transformers forwards (same device and dtypes as the services, each forward in
the dtype a split policy's worker would pick for its length, float32 CPU linears prepacked as the workers
hold them), after the services are stopped so nothing competes:
- SLM prefill of n prompt tokens, and one SLM decode step over a realistic cache;
- LLM forward of k new tokens over a cache (the catch-up when a token is routed; k = 1 is a decode step;
  a first catch-up covers the whole prompt too);
- one router call's compute (the strategy's `score` on one row).

The ideal cost of one answer replays its provenance (which model wrote each token):
  SLM prefill(prompt) + every token one SLM step (it proposes even the tokens it hands over)
  + a router score per scored token + for each routed token an LLM forward over the tokens since the LLM
  last ran (the whole prompt and answer so far the first time).
LLM-only answers: LLM prefill + one LLM step per token; SLM-only answers: SLM prefill + one step per token.
Costs between measured lengths are interpolated linearly (forwards cost close to linear in k on a CPU,
close to flat on a GPU; both interpolate well).
"""

from __future__ import annotations

import statistics
import time
from bisect import bisect_left
from dataclasses import dataclass, field

import torch

from r2r_serve.common.dtypes import default_prefill_from_tokens, parse_dtype_policy
from r2r_serve.common.tensors import parse_dtype
from r2r_serve.worker.engine import quantize_model
from r2r_serve.worker.prepack import prepack_available, prepack_linears

LENGTHS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, device, repeats: int) -> float:
    fn()  # warm-up: kernels chosen, buffers allocated
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


@dataclass
class CostTable:
    """ms by number of new tokens; `at(k)` interpolates (and extrapolates linearly past the last point)."""

    ms: dict[int, float] = field(default_factory=dict)

    def at(self, k: float) -> float:
        ks = sorted(self.ms)
        if k <= ks[0] or len(ks) == 1:
            return self.ms[ks[0] if k <= ks[0] else ks[-1]]
        if k >= ks[-1]:
            a, b = ks[-2], ks[-1]
            # Past the last point never extrapolate downwards: a forward of more tokens costs no less. With
            # one noisy repeat the last two points can fall, and a falling line goes negative for long prompts.
            slope = max(0.0, (self.ms[b] - self.ms[a]) / (b - a))
            return self.ms[b] + slope * (k - b)
        i = bisect_left(ks, k)
        a, b = ks[i - 1], ks[i]
        slope = (self.ms[b] - self.ms[a]) / (b - a)
        return self.ms[a] + slope * (k - a)


@dataclass
class Components:
    slm_prefill: CostTable
    slm_step_ms: float
    llm_forward: CostTable        # k new tokens over a cache of `context` tokens (k=1: a decode step)
    router_ms: float
    context: int
    repeats: int

    def to_json(self) -> dict:
        return {"slm_prefill_ms": self.slm_prefill.ms, "slm_step_ms": self.slm_step_ms,
                "llm_forward_ms": self.llm_forward.ms, "router_ms": self.router_ms,
                "context_tokens": self.context, "repeats": self.repeats}


@torch.inference_mode()
def forward_costs(model, lengths, context: int, device: torch.device, repeats: int) -> CostTable:
    """ms of one forward of k new tokens over a `context`-token cache, for each k in `lengths`."""
    from transformers import DynamicCache

    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    past_ids = torch.randint(0, vocab, (1, context), generator=gen).to(device)
    table = CostTable()
    for k in lengths:
        new = torch.randint(0, vocab, (1, k), generator=gen).to(device)
        cache = DynamicCache()
        if context:
            model(past_ids, cache=cache, use_cache=True)

        def step():
            model(new, cache=cache, use_cache=True,
                  position_ids=torch.arange(context, context + k, device=device)[None])
            cache.crop(-k)  # drop the k new tokens: the same cache length for the next repeat

        table.ms[k] = _median_ms(step, device, repeats)
    return table


def measure(slm_path: str, llm_path: str, *, device: str, slm_dtype: str, llm_dtype: str, strategy=None,
            slm_quantize: str = "none", llm_quantize: str = "none",
            context: int = 256, max_prefill: int = 512, repeats: int = 5,
            prefill_from_tokens: int | None = None, say=print) -> Components:
    """`slm_dtype`/`llm_dtype`: the workers' dtype policies; a forward of k tokens is timed in the dtype the
    worker runs it in (DECODE below `prefill_from_tokens`, PREFILL from it on; None: each worker's default
    crossover); `*_quantize` is applied to the DECODE weights, as the workers apply their --quantize."""
    from transformers import AutoModelForCausalLM

    dev = torch.device(device)

    def timed(path: str, spec: str, quantize: str, plan: list[tuple[list[int], int]]) -> list[CostTable]:
        """One CostTable per (lengths, context) in `plan`, each length in its policy's dtype."""
        policy = parse_dtype_policy(spec)
        packed = dev.type == "cpu" and prepack_available() and policy.prefill == "float32"
        crossover = prefill_from_tokens or default_prefill_from_tokens(packed, int8_decode=quantize == "int8-weight")
        tables = [CostTable() for _ in plan]
        for dtype in dict.fromkeys((policy.decode, policy.prefill)):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype)).to(dev).eval()
            if quantize != "none" and dtype == policy.decode:
                quantize_model(model, quantize)
            elif dev.type == "cpu" and prepack_available():
                prepack_linears(model)  # as the workers do (float32 layers only)
            for table, (ks, ctx) in zip(tables, plan):
                mine = [k for k in ks if (policy.prefill if k >= crossover else policy.decode) == dtype]
                if mine:
                    table.ms.update(forward_costs(model, mine, ctx, dev, repeats).ms)
            del model
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        return tables

    lengths = [k for k in LENGTHS if k <= max_prefill]
    say("timing the SLM ...")
    slm_prefill, slm_step = timed(slm_path, slm_dtype, slm_quantize, [([k for k in lengths if k >= 16], 0),
                                                                      ([1], context)])
    say("timing the LLM ...")
    (llm_forward,) = timed(llm_path, llm_dtype, llm_quantize, [(lengths, context)])
    slm_prefill.ms, llm_forward.ms = dict(sorted(slm_prefill.ms.items())), dict(sorted(llm_forward.ms.items()))
    router_ms = _router_ms(strategy, repeats) if strategy is not None else 0.0
    return Components(slm_prefill, slm_step.ms[1], llm_forward, router_ms, context, repeats)


def _router_ms(strategy, repeats: int) -> float:
    """One row through the strategy's scoring: its compute only, no gRPC (the values don't matter)."""
    from r2r_serve.router.features import FeatureBatch

    batch = FeatureBatch.random(1, strategy.hidden_size or 896, strategy.top_k or 100,
                                generator=torch.Generator().manual_seed(0))
    return _median_ms(lambda: strategy.score(batch), torch.device("cpu"), repeats * 4)


def ideal_seconds(sources: list[str], prompt_tokens: int, c: Components, mode: str) -> dict:
    """Ideal cost of one answer; `mode` is "slm", "llm" or "r2r". Returns the parts in seconds."""
    n = len(sources)
    if mode == "llm":
        llm = c.llm_forward.at(prompt_tokens) + max(0, n - 1) * c.llm_forward.at(1)
        return {"slm_s": 0.0, "router_s": 0.0, "llm_s": llm / 1000, "total_s": llm / 1000}
    slm = c.slm_prefill.at(prompt_tokens) + max(0, n - 1) * c.slm_step_ms
    router = llm = 0.0
    if mode == "r2r":
        router = n * c.router_ms
        synced = 0  # tokens (prompt + answer) already in the LLM's cache
        for i, src in enumerate(sources):
            if src == "llm":
                llm += c.llm_forward.at(prompt_tokens + i - synced)
                synced = prompt_tokens + i
    total = slm + router + llm
    return {"slm_s": slm / 1000, "router_s": router / 1000, "llm_s": llm / 1000, "total_s": total / 1000}
