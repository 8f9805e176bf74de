"""What one forward of a worker costs, per dtype / quantization, on this machine.

    python bench/forward_costs.py --model DIR --variants fp32,bf16,int8 --repeats 5

Loads the model folder once per base dtype and times, over a fixed past KV cache of ~200 tokens
(DynamicCache, cropped back after every timed forward so its length never changes):
  decode    one greedy decode step (the model's own next token), as the SLM worker runs it
  k=1..32   an extend forward over k new tokens, as the LLM's catch-up runs it
Each forward is what the engine does: the decoder over the new tokens, then lm_head on the last position.
Variants are interleaved (every repeat times every variant at each k, in a rotating order), so machine
drift hits them alike; the table shows medians of --repeats.

Variants:
  fp32, bf16     plain weights in that dtype
  fp32-packed    fp32 with every linear on oneDNN prepacked weights (worker/prepack.py, the workers' CPU default)
  int8           torch.ao dynamic int8 quantization of every nn.Linear (lm_head included), per-tensor weight
                 scales, on the fp32 model (activations quantized on the fly, fp32 everywhere else)
  int8-nohead    the same, lm_head left in fp32
  int8pc         per-channel weight scales (per_channel_dynamic_qconfig), lm_head included
  int8pc-nodown  int8pc with every mlp.down_proj left in fp32 (its inputs carry the largest activation
                 outliers, which per-tensor dynamic activation quantization handles worst)
  int8pc-mix     int8pc for q/k/v/o/gate/up; down_proj and lm_head in bf16 (the bf16 model's layers, with
                 casts), everything else fp32
  int8-bf16      the int8 linears inside the bf16 model (norms, attention, embeddings, KV cache in bf16;
                 activations cast to fp32 around each quantized linear, which takes fp32 only)
  bf16-int8w     the workers' --quantize int8-weight on the bf16 model (worker/int8_weights.py): int8 weights,
                 per-channel scales, at every length on AVX2-only CPUs, below 8 token rows on CPUs with bf16 units
  bf16-int8w8    the same with int8 below 8 rows everywhere, the dense bf16 weights from 8 on
  phase          "dtype per phase": the bf16 model for k < --phase-crossover, the fp32 one from it on;
                 the KV cache is kept in fp32 and cast to bf16 for a bf16 forward (the cast is timed)
Quality columns: top-1 agreement with fp32 and mean KL(fp32 || variant) of the next-token distributions at
every position of the ~200-token prefill (the weights on disk are bf16, so fp32 is the exact reference).

Writes bench/results/forward_costs.json (one entry per model folder, merged with earlier runs).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import itertools
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench.*` importable as a script
from bench.machine import machine_description  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 150)
ALL_VARIANTS = ["fp32", "fp32-packed", "bf16", "bf16-int8w", "bf16-int8w8", "int8", "int8-nohead", "int8pc",
                "int8pc-nodown", "int8pc-mix", "int8-bf16", "phase"]
KS = [1, 2, 4, 8, 16, 32]

# Code, as the default pair serves it; long enough for a 200-token past plus 32 new tokens.
TEXT = '''import heapq
from collections import defaultdict, deque
from dataclasses import dataclass, field


@dataclass(order=True)
class Job:
    priority: int
    name: str = field(compare=False)
    deps: list[str] = field(default_factory=list, compare=False)


def topological_order(jobs: list[Job]) -> list[str]:
    """Return job names so that every job comes after its dependencies; ties by priority."""
    by_name = {job.name: job for job in jobs}
    indegree = defaultdict(int)
    children = defaultdict(list)
    for job in jobs:
        for dep in job.deps:
            if dep not in by_name:
                raise KeyError(f"unknown dependency {dep!r} of {job.name!r}")
            children[dep].append(job.name)
            indegree[job.name] += 1
    ready = [by_name[n] for n in by_name if indegree[n] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        job = heapq.heappop(ready)
        order.append(job.name)
        for child in children[job.name]:
            indegree[child] -= 1
            if indegree[child] == 0:
                heapq.heappush(ready, by_name[child])
    if len(order) != len(jobs):
        raise ValueError("the dependencies form a cycle")
    return order


def shortest_path(graph: dict[str, list[str]], start: str, goal: str) -> list[str] | None:
    """Breadth-first search; None when the goal cannot be reached."""
    previous = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            path = []
            while node is not None:
                path.append(node)
                node = previous[node]
            return path[::-1]
        for nxt in graph.get(node, []):
            if nxt not in previous:
                previous[nxt] = node
                queue.append(nxt)
    return None
'''


def shallow_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree that shares every parameter and buffer with `model` (no weight memory)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def quantize_linear(linear: torch.nn.Linear, per_channel: bool) -> torch.nn.Module:
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    return quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear: qconfig}, dtype=torch.qint8)[0]


class CastLinear(torch.nn.Module):
    """A linear layer that computes in `dtype` inside a model of another dtype (casts in and out)."""

    def __init__(self, inner: torch.nn.Module, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x):
        return self.inner(x.to(self.dtype)).to(x.dtype)


class Variant:
    def __init__(self, name: str, model, note: str, param_bytes: int):
        self.name, self.model, self.note, self.param_bytes = name, model, note, param_bytes
        self.base = getattr(model, model.base_model_prefix) if model is not None else None
        self.head = model.get_output_embeddings() if model is not None else None
        self.cache = None
        self.samples: dict[str, list[float]] = {}
        self.quality: dict[str, float] = {}


def module_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads: float parameters plus int8 linear weights (an int8-weight layer
    reads its int8 copy, not its dense one)."""
    from r2r_serve.worker.int8_weights import Int8WeightLinear

    total, seen = 0, set()
    for mod in model.modules():
        if isinstance(mod, Int8WeightLinear):
            seen.add(id(mod.weight))
            total += sum(t.numel() * t.element_size() for t in (mod.qweight, mod.scales))
        for p in mod.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
        if isinstance(mod, torch.ao.nn.quantized.dynamic.Linear) and id(mod) not in seen:
            seen.add(id(mod))
            w, b = mod.weight(), mod.bias()
            total += w.numel() * w.element_size() + (b.numel() * b.element_size() if b is not None else 0)
    return total


def build_variants(path: str, names: list[str]) -> tuple[dict[str, Variant], dict]:
    from transformers import AutoModelForCausalLM

    loaded, load_s = {}, {}

    def load(dtype_name: str):
        if dtype_name not in loaded:
            started = time.perf_counter()
            loaded[dtype_name] = AutoModelForCausalLM.from_pretrained(
                path, dtype=getattr(torch, dtype_name)).eval()
            load_s[dtype_name] = round(time.perf_counter() - started, 1)
        return loaded[dtype_name]

    qcache: dict[tuple[str, bool], torch.nn.Module] = {}

    def qlinear(fp32, name: str, per_channel: bool):
        key = (name, per_channel)
        if key not in qcache:
            qcache[key] = quantize_linear(fp32.get_submodule(name), per_channel)
        return qcache[key]

    def linear_names(model, include_head: bool, skip_suffix: str | None = None) -> list[str]:
        head = model.get_output_embeddings()
        return [n for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and (include_head or m is not head)
                and not (skip_suffix and n.endswith(skip_suffix))]

    variants = {}
    needs_fp32 = any(n != "bf16" for n in names)
    needs_bf16 = any(n in ("bf16", "bf16-int8w", "bf16-int8w8", "int8-bf16", "int8pc-mix", "phase") for n in names)
    fp32 = load("float32") if needs_fp32 else None
    bf16 = load("bfloat16") if needs_bf16 else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        for name in names:
            if name == "fp32":
                variants[name] = Variant(name, fp32, "fp32 weights", module_bytes(fp32))
            elif name == "bf16":
                variants[name] = Variant(name, bf16, "bf16 weights", module_bytes(bf16))
            elif name in ("bf16-int8w", "bf16-int8w8"):
                from r2r_serve.worker.int8_weights import BF16_UNITS_MAX_ROWS, default_max_rows, describe_max_rows
                from r2r_serve.worker.int8_weights import quantize_int8_weights

                rows = BF16_UNITS_MAX_ROWS if name == "bf16-int8w8" else default_max_rows(torch.bfloat16)
                m = shallow_copy(bf16)
                quantize_int8_weights(m, max_rows=rows)
                dense = ", bf16 dense above" if rows is not None else ""
                variants[name] = Variant(name, m, f"int8 weights {describe_max_rows(rows)}{dense}", module_bytes(m))
            elif name == "fp32-packed":
                from r2r_serve.worker.prepack import prepack_linears

                m = shallow_copy(fp32)
                prepack_linears(m)
                variants[name] = Variant(name, m, "fp32, prepacked linears", module_bytes(fp32))
            elif name in ("int8", "int8-nohead", "int8pc", "int8pc-nodown"):
                m = shallow_copy(fp32)
                per_channel = name.startswith("int8pc")
                skip = "mlp.down_proj" if name == "int8pc-nodown" else None
                for n in linear_names(m, include_head=name != "int8-nohead", skip_suffix=skip):
                    m.set_submodule(n, qlinear(fp32, n, per_channel))
                note = {"int8": "dynamic int8, per-tensor, lm_head int8",
                        "int8-nohead": "dynamic int8, per-tensor, lm_head fp32",
                        "int8pc": "dynamic int8, per-channel, lm_head int8",
                        "int8pc-nodown": "dynamic int8, per-channel, lm_head int8, down_proj fp32"}[name]
                variants[name] = Variant(name, m, note, module_bytes(m))
            elif name == "int8pc-mix":
                m = shallow_copy(fp32)
                head_name = next(n for n, mod in m.named_modules() if mod is m.get_output_embeddings())
                for n in linear_names(m, include_head=True):
                    if n.endswith("mlp.down_proj") or n == head_name:
                        m.set_submodule(n, CastLinear(bf16.get_submodule(n), torch.bfloat16))
                    else:
                        m.set_submodule(n, qlinear(fp32, n, True))
                variants[name] = Variant(name, m, "int8 per-channel; down_proj, lm_head bf16", module_bytes(m))
            elif name == "int8-bf16":
                m = shallow_copy(bf16)
                for n in linear_names(m, include_head=True):
                    m.set_submodule(n, CastLinear(qlinear(fp32, n, False)))
                variants[name] = Variant(name, m, "int8 linears (per-tensor) in the bf16 model", module_bytes(m))
            elif name == "phase":
                v = Variant(name, None, "", module_bytes(fp32) + module_bytes(bf16))
                v.fp32, v.bf16 = fp32, bf16
                variants[name] = v
            else:
                raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(ALL_VARIANTS)}")
    return variants, {"fp32": fp32, "load_s": load_s}


def crop_to(cache, length: int) -> None:
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)  # transformers 5.x: a negative count of tokens to drop


def kv_layers(cache):
    return [(layer.keys, layer.values) for layer in cache.layers]


@torch.inference_mode()
def prefill(v: Variant, ids: torch.Tensor, ref_logits: torch.Tensor | None) -> torch.Tensor:
    """Build the variant's past cache over `ids`; return its logits at every position (fp32)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    out = v.base(input_ids=ids, cache=cache, use_cache=True)
    logits = v.head(out.last_hidden_state[0]).float()
    v.cache = cache
    if ref_logits is not None:
        ref_logp = torch.log_softmax(ref_logits, -1)
        logp = torch.log_softmax(logits, -1)
        v.quality = {
            "top1_agreement_vs_fp32": round(float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()), 4),
            "mean_kl_vs_fp32": round(float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()), 5),
        }
    return logits


@torch.inference_mode()
def timed_forward(v: Variant, ids: torch.Tensor, past: int, crossover: int) -> float:
    """One engine-style forward over `ids` on top of the `past`-token cache; the cache is cropped back."""
    if v.name == "phase":
        return timed_phase(v, ids, past, crossover)
    started = time.perf_counter()
    out = v.base(input_ids=ids, cache=v.cache, use_cache=True)
    int(v.head(out.last_hidden_state[:, -1]).argmax(-1))
    ms = (time.perf_counter() - started) * 1000
    crop_to(v.cache, past)
    return ms


def timed_phase(v: Variant, ids: torch.Tensor, past: int, crossover: int) -> float:
    from transformers import DynamicCache

    master = v.cache  # fp32
    started = time.perf_counter()
    if ids.shape[1] >= crossover:
        out = v.fp32.model(input_ids=ids, cache=master, use_cache=True)
        int(v.fp32.lm_head(out.last_hidden_state[:, -1]).argmax(-1))
    else:
        cache = DynamicCache(ddp_cache_data=[(k.to(torch.bfloat16), vv.to(torch.bfloat16))
                                             for k, vv in kv_layers(master)])
        out = v.bf16.model(input_ids=ids, cache=cache, use_cache=True)
        int(v.bf16.lm_head(out.last_hidden_state[:, -1]).argmax(-1))
        # the new entries join the fp32 master cache, as a worker would keep them
        for layer, (k, vv) in zip(master.layers, kv_layers(cache)):
            layer.keys = torch.cat([layer.keys, k[:, :, past:].float()], dim=2)
            layer.values = torch.cat([layer.values, vv[:, :, past:].float()], dim=2)
    ms = (time.perf_counter() - started) * 1000
    crop_to(master, past)
    return ms


def run(args) -> dict:
    from transformers import AutoTokenizer

    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    text_ids = tokenizer(TEXT)["input_ids"]
    need = args.past + max(KS)
    if len(text_ids) < need:
        text_ids = (text_ids * (need // len(text_ids) + 1))
    past_ids = torch.tensor([text_ids[: args.past]])
    new_ids = text_ids[args.past: args.past + max(KS)]

    with console.status(f"loading {args.model} ({', '.join(names)}) ..."):
        variants, extra = build_variants(args.model, names)
    console.print(f"loaded in {extra['load_s']} s (per base dtype); threads={torch.get_num_threads()}")

    # Past caches, the fp32 reference logits and the quality columns.
    ref_logits = None
    if extra["fp32"] is not None:
        with console.status("fp32 reference prefill ..."):
            ref = Variant("ref", extra["fp32"], "", 0)
            ref_logits = prefill(ref, past_ids, None)
            del ref
    next_token = {}
    for v in variants.values():
        with console.status(f"{v.name}: prefill of {args.past} tokens ..."):
            started = time.perf_counter()
            if v.name == "phase":
                tmp = Variant("ref", v.fp32, "", 0)  # its own fp32 cache
                prefill(tmp, past_ids, None)
                v.cache = tmp.cache
                next_token[v.name] = int(ref_logits[-1].argmax())
                continue
            logits = prefill(v, past_ids, ref_logits)
            next_token[v.name] = int(logits[-1].argmax())
        console.print(f"  {v.name}: prefill {time.perf_counter() - started:.1f} s  {v.quality}")
        gc.collect()

    points = ["decode"] + [f"k{k}" for k in KS]

    def ids_for(v: Variant, point: str) -> torch.Tensor:
        if point == "decode":
            return torch.tensor([[next_token[v.name]]])
        return torch.tensor([new_ids[: int(point[1:])]])

    order = list(variants.values())
    with console.status("warm-up (one untimed forward per variant and shape) ..."):
        for point in points:
            for v in order:
                timed_forward(v, ids_for(v, point), args.past, args.phase_crossover)
    started = time.perf_counter()
    for rep in range(args.repeats):
        for point in points:
            shift = rep % len(order)
            for v in order[shift:] + order[:shift]:  # rotating order: no variant always goes first
                v.samples.setdefault(point, []).append(timed_forward(v, ids_for(v, point), args.past,
                                                                     args.phase_crossover))
        console.print(f"  repeat {rep + 1}/{args.repeats} done ({time.perf_counter() - started:.0f} s)")

    result = {
        "model": args.model,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_description(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "past_tokens": args.past,
        "repeats": args.repeats,
        "phase_crossover": args.phase_crossover,
        "load_s": extra["load_s"],
        "variants": {},
    }
    for v in variants.values():
        medians = {p: round(statistics.median(s), 1) for p, s in v.samples.items()}
        result["variants"][v.name] = {
            "note": v.note or f"bf16 for k < {args.phase_crossover}, fp32 from it on (fp32 KV cache)",
            "weight_bytes": v.param_bytes,
            "median_ms": medians,
            "samples_ms": {p: [round(x, 1) for x in s] for p, s in v.samples.items()},
            **v.quality,
        }
    return result


def show(result: dict) -> None:
    points = ["decode"] + [f"k{k}" for k in KS]
    table = Table(title=f"{Path(result['model']).name}: ms per forward (median of {result['repeats']}), "
                        f"past {result['past_tokens']} tokens, {result['threads']} threads")
    table.add_column("variant")
    for p in points:
        table.add_column("decode" if p == "decode" else f"k={p[1:]}", justify="right")
    table.add_column("weights GB", justify="right")
    table.add_column("top-1 = fp32", justify="right")
    table.add_column("KL vs fp32", justify="right")
    best = {p: min(v["median_ms"][p] for v in result["variants"].values()) for p in points}
    for name, v in result["variants"].items():
        cells = []
        for p in points:
            ms = v["median_ms"][p]
            cells.append(f"[bold green]{ms:.0f}[/]" if ms == best[p] else f"{ms:.0f}")
        agree = v.get("top1_agreement_vs_fp32")
        kl = v.get("mean_kl_vs_fp32")
        table.add_row(name, *cells, f"{v['weight_bytes'] / 1e9:.2f}",
                      "" if agree is None else f"{agree:.1%}", "" if kl is None else f"{kl:.4f}")
    console.print(table)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model folder")
    p.add_argument("--variants", default="fp32,bf16,int8", help=f"comma-separated, from {','.join(ALL_VARIANTS)}")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--past", type=int, default=200, help="tokens in the past KV cache")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--phase-crossover", type=int, default=12,
                   help="'phase' variant: first k that runs in fp32 (bf16 below)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "forward_costs.json"))
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    result = run(args)
    show(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(out.read_text()) if out.exists() else {}
    merged.setdefault("models", {})[Path(args.model).name] = result
    out.write_text(json.dumps(merged, indent=1) + "\n")
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
