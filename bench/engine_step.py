"""What one ModelEngine step costs in-process (no gRPC), against the bare HF decode step.

    python bench/engine_step.py [--model DIR] [--device cpu|cuda] [--dtype bfloat16] [--batches 1,2,4,8]

For each batch size B it opens B sessions with ~--past tokens of KV cache (ragged: session b holds
past + 2*b tokens, as concurrent sessions do), then times steady-state decode steps: one `extend` call
with B one-token works, each session's own last token, as the SLM worker runs them. Variants, interleaved
(every repeat times each at every B, in a rotating order, so machine drift hits them alike):

  hf            the bare model: model(...) with one DynamicCache over B sequences of equal length (past
                tokens each), argmax of the last logits (B=1 is the plain HF batch-1 decode)
  feat          the engine, SLM role, router features wanted for every session
  nofeat        the engine, SLM role, no features wanted
  legacy-feat   the same through the engine's reference paths (EngineConfig(fast_paths=False)), when the
  legacy-nofeat engine has them: the ragged left-padded forward for every batch and the per-row features

Every variant starts each repeat from the same state: sessions are rewound (an untimed extend at the
original position, which crops the KV) and the HF cache is cropped back. The table shows medians over all
timed steps; `over hf` is the engine's ms/step minus the bare model's at the same B. The breakdown is
the engine's own phase timers (ModelEngine.phase_times), median ms per step:
  kv        building/splitting the batch's KV (padding, gathers, cache objects)
  forward   the decoder forward
  head      lm_head + token choice
  features  router features (device work, host copies, protobuf packing)
  outcomes  per-session results
  other     the rest of `extend` (validation, admission, metrics)
On CUDA the phase timers synchronize the device; pass --phases to turn them on there (off by default,
so the ms/step column stays honest).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from r2r_serve.worker.engine import EngineConfig, ExtendWork, ModelEngine

DEFAULT_MODEL = Path.home() / ".cache/r2r-serve/models/qwen2.5-coder-0.5b-instruct"
PHASES = ["kv", "forward", "head", "features", "outcomes"]


def prompt_rows(tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` different token sequences of `length` tokens, cut from this repository's engine source."""
    text = (Path(__file__).resolve().parents[1] / "services/worker/engine.py").read_text()
    ids = tokenizer(text)["input_ids"]
    while len(ids) < length + 40 * count:
        ids = ids + ids
    return [ids[40 * i: 40 * i + length] for i in range(count)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HFVariant:
    """The bare model: B equal-length sequences decoded together with one DynamicCache."""

    name = "hf"

    def __init__(self, model, rows: list[list[int]], past: int, device):
        from transformers import DynamicCache

        self.model, self.device, self.past = model, device, past
        self.cache = DynamicCache()
        ids = torch.tensor([r[:past] for r in rows], device=device)
        with torch.inference_mode():
            out = model(input_ids=ids, cache=self.cache, use_cache=True)
        self.next = out.logits[:, -1].argmax(-1, keepdim=True)

    def rewind(self) -> None:
        extra = self.cache.get_seq_length() - self.past
        if extra > 0:
            for layer in self.cache.layers:
                layer.crop(-extra)

    @torch.inference_mode()
    def step(self) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        out = self.model(input_ids=self.next, cache=self.cache, use_cache=True)
        self.next = out.logits[:, -1].argmax(-1, keepdim=True)
        self.next.cpu()  # generate() reads the tokens back every step too
        return time.perf_counter() - t0


class EngineVariant:
    def __init__(self, name: str, engine: ModelEngine, rows: list[list[int]], past: int, features: bool, tag: str):
        self.name, self.engine, self.features = name, engine, features
        self.sids = [f"{tag}-{name}-{b}" for b in range(len(rows))]
        self.rows = [r[: past + 2 * b + 1] for b, r in enumerate(rows)]  # +1: the token the rewind re-feeds
        self.phase_totals: dict[str, list[float]] | None = {}
        self.timed = True
        self.last: list[int] = []
        for sid, row in zip(self.sids, self.rows):  # prefill one by one (untimed)
            engine.extend([ExtendWork(sid, 0, row[:-1])])

    def rewind(self) -> None:
        """An untimed decode step at each session's original position: crops the KV back, re-feeds the
        prompt's next token, and leaves the engine in the steady state the timed steps measure."""
        works = [ExtendWork(sid, len(row) - 1, [row[-1]], want_features=self.features)
                 for sid, row in zip(self.sids, self.rows)]
        self.last = [o.token for o in self._extend(works)]

    def _extend(self, works):
        outs = self.engine.extend(works)
        bad = [o for o in outs if o.status != "ok"]
        if bad:
            raise RuntimeError(f"{self.name}: {bad[0].status}: {bad[0].error}")
        return outs

    def step(self) -> float:
        works = [ExtendWork(sid, self.engine.kv.held(sid), [tok], want_features=self.features)
                 for sid, tok in zip(self.sids, self.last)]
        self.engine.phase_times = {} if self.phase_totals is not None else None
        sync(self.engine.device)
        t0 = time.perf_counter()
        outs = self._extend(works)
        sync(self.engine.device)
        elapsed = time.perf_counter() - t0
        if self.engine.phase_times is not None and self.timed:
            for k in PHASES:
                self.phase_totals.setdefault(k, []).append(self.engine.phase_times.get(k, 0.0))
            self.phase_totals.setdefault("total", []).append(elapsed)
        self.engine.phase_times = None
        self.last = [o.token for o in outs]
        return elapsed

    def release(self) -> None:
        self.engine.release(self.sids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--past", type=int, default=200, help="KV tokens per session before the timed steps")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--variants", default="hf,feat,nofeat,legacy-feat,legacy-nofeat")
    ap.add_argument("--phases", action="store_true", help="phase timers on CUDA too (they synchronize)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    batches = [int(b) for b in args.batches.split(",")]
    wanted = args.variants.split(",")
    cfg = EngineConfig(model=args.model, role="slm", device=args.device, dtype=args.dtype, threads=args.threads)
    has_legacy = "fast_paths" in {f.name for f in dataclasses.fields(EngineConfig)}
    engines = {"fast": ModelEngine(cfg)}
    engines["fast"].load()
    if has_legacy and any(v.startswith("legacy") for v in wanted):
        engines["legacy"] = ModelEngine(dataclasses.replace(cfg, fast_paths=False))
        engines["legacy"].load()
    for e in engines.values():
        e.warmup()
    device = engines["fast"].device
    phases_on = device.type == "cpu" or args.phases
    print(f"model {args.model} | {args.dtype} on {device} | torch threads {torch.get_num_threads()} | "
          f"past {args.past} | {args.steps} steps x {args.repeats} repeats")

    results = []
    for B in batches:
        rows = prompt_rows(engines["fast"].tokenizer, B, args.past + 2 * B + 1)
        variants = []
        for name in wanted:
            if name == "hf":
                variants.append(HFVariant(engines["fast"].model, rows, args.past, device))
                continue
            legacy = name.startswith("legacy")
            if legacy and "legacy" not in engines:
                continue
            v = EngineVariant(name, engines["legacy" if legacy else "fast"], rows, args.past,
                              features=name.endswith("-feat") or name == "feat", tag=f"b{B}")
            v.phase_totals = {} if phases_on else None
            variants.append(v)
        times = {v.name: [] for v in variants}
        for rep in range(args.repeats):
            shift = rep % len(variants)
            for v in variants[shift:] + variants[:shift]:
                v.rewind()
                v.timed = False
                v.step()  # one untimed step: the first after a rewind may rebuild batch state
                v.timed = True
                times[v.name] += [v.step() for _ in range(args.steps)]
        hf_ms = statistics.median(times["hf"]) * 1000 if "hf" in times else None
        for v in variants:
            ms = statistics.median(times[v.name]) * 1000
            row = dict(batch=B, variant=v.name, ms_per_step=round(ms, 2), ms_per_token=round(ms / B, 2),
                       over_hf_ms=round(ms - hf_ms, 2) if hf_ms is not None else None)
            if isinstance(v, EngineVariant) and v.phase_totals:
                phases = {k: statistics.median(v.phase_totals[k]) * 1000 for k in PHASES}
                phases["other"] = statistics.median(
                    t - sum(v.phase_totals[k][i] for k in PHASES) for i, t in enumerate(v.phase_totals["total"])) * 1000
                row["phases_ms"] = {k: round(x, 2) for k, x in phases.items()}
            results.append(row)
            if isinstance(v, EngineVariant):
                v.release()

    head = f"{'B':>3} {'variant':<14} {'ms/step':>9} {'ms/tok':>8} {'over hf':>8}  " + \
        " ".join(f"{p:>8}" for p in PHASES + ["other"])
    print(head)
    print("-" * len(head))
    for r in results:
        over = f"{r['over_hf_ms']:+8.2f}" if r["over_hf_ms"] is not None and r["variant"] != "hf" else " " * 8
        ph = r.get("phases_ms")
        cols = " ".join(f"{ph[p]:8.2f}" for p in PHASES + ["other"]) if ph else ""
        print(f"{r['batch']:>3} {r['variant']:<14} {r['ms_per_step']:9.2f} {r['ms_per_token']:8.2f} {over}  {cols}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(model=args.model, device=str(device), dtype=args.dtype,
                                                   past=args.past, results=results), indent=1))


if __name__ == "__main__":
    main()
