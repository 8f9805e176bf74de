"""Split dtype policies (common/dtypes.py): DECODE weights for short forwards, PREFILL weights for long ones.

A worker with dtype "float64/float32" runs forwards of fewer than `prefill_from_tokens` token rows in
float64 and longer ones (prefills, long catch-ups, wide decode batches) in float32, keeping its KV cache in
float64. Against a plain float64 worker fed the same calls it must choose the same tokens (the tiny models'
distributions are peaked: float32 rounding cannot flip them) with log-probs and router features within
float32 rounding, use both sets of weights, and never leave KV in the other dtype. Through the services, the
anchors hold: threshold > 1 is the SLM's own generate(), 0 the LLM's, between them the reference loop.
"""

from __future__ import annotations

import asyncio
import types

import numpy as np
import pytest
import pytest_asyncio
import torch

from conftest import TOP_K, worker_config
from r2r_serve.common.dtypes import DtypePolicy, parse_dtype_policy
from r2r_serve.common.tensors import from_proto
from r2r_serve.router.strategies import EntropyStrategy
from r2r_serve.worker.engine import ExtendWork, ModelEngine
from r2r_serve.worker.sampling import Sampling
from reference import reference_r2r
from test_anchors import PROMPTS, hf_generate, ids_of

SPLIT_FROM = 4  # forwards of >= 4 token rows use the prefill weights


def test_policy_specs():
    assert parse_dtype_policy("float32") == DtypePolicy("float32", "float32")
    split = parse_dtype_policy("bfloat16/float32")
    assert (split.decode, split.prefill, split.split, str(split)) == ("bfloat16", "float32", True, "bfloat16/float32")
    assert str(parse_dtype_policy("float32/float32")) == "float32"
    for bad in ("fp32", "bfloat16/", "float32/float16/float64", ""):
        with pytest.raises(ValueError, match="DECODE/PREFILL"):
            parse_dtype_policy(bad)


def test_int8_refuses_a_split_policy():
    from r2r_serve.worker.engine import check_quantize

    with pytest.raises(ValueError, match="needs dtype float32"):
        check_quantize("int8", "cpu", "bfloat16/float32")


def _engine(path, dtype: str) -> ModelEngine:
    engine = ModelEngine(worker_config(path, "slm", prefill_from_tokens=SPLIT_FROM))
    engine.config.dtype = dtype
    engine.load()
    return engine


def _kv_dtypes(engine: ModelEngine) -> set[torch.dtype]:
    found = set()
    for sid in list(engine.kv._sessions):
        s = engine.kv.get(sid)
        if s.group is not None:
            found |= {t.dtype for t in s.group.keys + s.group.values}
        for k, v in s.layers or []:
            found |= {k.dtype, v.dtype}
    return found


class Driver:
    """Feeds a split-policy engine and a plain one the same calls (the plain one's tokens go to both)."""

    def __init__(self, split: ModelEngine, plain: ModelEngine, tol: float):
        self.split, self.plain, self.tol = split, plain, tol
        self.history: dict[str, list[int]] = {}
        self.next: dict[str, int] = {}

    def run(self, items: list[tuple[str, list[int] | None]], sampling: Sampling | None = None) -> None:
        works = []
        for sid, toks in items:
            toks = toks if toks is not None else [self.next[sid]]
            hist = self.history.setdefault(sid, [])
            works.append(ExtendWork(sid, len(hist), list(toks), sampling=sampling or Sampling(), want_features=True))
            hist.extend(toks)
        for got, want in zip(self.split.extend(works), self.plain.extend(works)):
            assert got.status == want.status == "ok", got.error or want.error
            assert (got.token, got.held_tokens) == (want.token, want.held_tokens)
            assert got.logprob == pytest.approx(want.logprob, abs=self.tol)
            for field in ("hidden_state", "topk_logits", "token_embedding"):
                torch.testing.assert_close(from_proto(getattr(got.features, field)),
                                           from_proto(getattr(want.features, field)), rtol=self.tol, atol=self.tol)
            assert got.features.entropy == pytest.approx(want.features.entropy, abs=self.tol)
            self.next[got.session_id] = want.token
        assert _kv_dtypes(self.split) <= {self.split.dtype}


@pytest.mark.parametrize("dtype", ["float64/float32", "float32/float64"])
def test_split_engine_matches_a_plain_engine(tiny_pair, dtype):
    split, plain = _engine(tiny_pair["slm"], dtype), _engine(tiny_pair["slm"], "float64")
    assert split.prefill_weights.dtype != split.decode_weights.dtype
    split.forwards_by_dtype.clear()
    d = Driver(split, plain, tol=1e-4)
    d.run([("a", list(range(5, 17))), ("b", list(range(40, 47))), ("c", list(range(100, 121)))])  # prefill
    for _ in range(4):
        d.run([("a", None), ("b", None), ("c", None)])           # 3 rows: decode weights, in a DecodeGroup
    d.run([("d", [7, 8]), ("e", [9])])                            # 2 x 2 padded rows: decode weights, ragged
    for _ in range(3):
        d.run([(s, None) for s in "abcde"])                       # 5 rows: prefill weights on the group's KV
    d.run([("a", [3, 4, 5, 6, 7, 8, 9]), ("b", None)])            # a long catch-up beside a decoder
    d.run([("c", [11, 12, 13])])                                  # one session, 3 rows: decode weights
    d.run([("d", [14, 15, 16, 17, 18])])                          # one session, 5 rows: prefill weights
    for _ in range(2):
        d.run([("a", None), ("c", None)])
    d.run([(s, None) for s in "abcde"], sampling=Sampling(temperature=0.9, top_k=20, seed=5))
    used = split.forwards_by_dtype
    assert set(used) == {"float64", "float32"} and min(used.values()) >= 3, used
    assert set(plain.forwards_by_dtype) == {"float64"}


@pytest_asyncio.fixture(scope="module")
async def split_services(tiny_pair):
    from r2r_serve.coordinator.app import start_coordinator
    from r2r_serve.router.app import start_router
    from r2r_serve.worker.app import start_worker

    handles = []
    for role in ("slm", "llm"):
        config = worker_config(tiny_pair[role], role, prefill_from_tokens=SPLIT_FROM)
        config.dtype = "float64/float32"
        handles.append(await start_worker(config))
    router = await start_router("entropy")
    coord = await start_coordinator(*(f"127.0.0.1:{h.port}" for h in (*handles, router)))
    yield types.SimpleNamespace(slm=handles[0], llm=handles[1], target=f"127.0.0.1:{coord.port}")
    for handle in (coord, router, *handles):
        await handle.stop(0.5)


def _threshold_between_scores(hf, prompt_ids) -> float:
    """Halfway between two neighbouring router scores of an SLM-only pass near its median: far (relative to
    float32 rounding) from every score, so a split worker's tiny differences cannot flip a routing."""
    probe = reference_r2r(hf.slm, hf.llm, prompt_ids, 16, 0.5, EntropyStrategy(), TOP_K, {hf.tokenizer.eos_token_id})
    scores = np.unique(np.float32(probe.probabilities))
    mid = len(scores) // 2
    return float((scores[mid - 1] + scores[mid]) / 2)


async def test_anchors_hold_with_split_workers(split_services, hf):
    from r2r_client import AsyncR2RClient

    eos = hf.tokenizer.eos_token_id
    prompts = [ids_of(hf, p) for p in PROMPTS]
    threshold = _threshold_between_scores(hf, prompts[0])
    async with AsyncR2RClient(split_services.target) as client:
        for prompt, ids in zip(PROMPTS[:2], prompts):
            slm_only = await client.generate(prompt, max_tokens=20, threshold=1.5)
            assert slm_only.token_ids == hf_generate(hf.slm, ids, 20, eos)
            llm_only = await client.generate(prompt, max_tokens=20, threshold=0.0)
            assert llm_only.token_ids == hf_generate(hf.llm, ids, 20, eos)
        results = await asyncio.gather(*(client.generate(p, max_tokens=20, threshold=threshold) for p in PROMPTS))
    routed = 0
    for ids, result in zip(prompts, results):
        ref = reference_r2r(hf.slm, hf.llm, ids, 20, threshold, EntropyStrategy(), TOP_K, {eos})
        assert (result.token_ids, result.sources) == (ref.tokens, ref.sources)
        routed += ref.sources.count("llm")
    assert routed > 0
    for handle in (split_services.slm, split_services.llm):  # both sets of weights served real tokens
        used = handle.servicer.engine.forwards_by_dtype
        assert used.get("float64", 0) > 0 and used.get("float32", 0) > 0, used


@pytest.mark.parametrize("flags, cpu_choice", [
    ({"avx2", "avx512_bf16"}, "bfloat16"),      # bf16 units: bf16 wins at every forward length
    ({"avx2", "amx_bf16"}, "bfloat16"),
    ({"avx2", "fma"}, "bfloat16/float32"),      # AVX2 only: bf16 decode steps, fp32 long forwards
    (set(), "float32"),                         # anything else (another architecture): fp32
])
def test_auto_dtype_by_cpu(monkeypatch, flags, cpu_choice):
    from r2r_serve.common import cpu
    from r2r_serve.models import pair_config

    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
    assert pair_config.auto_dtype("cpu") == cpu_choice
    assert pair_config.auto_dtype("cuda:0") == "bfloat16"


@pytest.mark.parametrize("prepacked, int8, rows", [(True, False, 2), (False, False, 6), (True, True, 16)])
def test_the_default_crossover_follows_how_the_weights_are_held(prepacked, int8, rows):
    from r2r_serve.common.dtypes import default_prefill_from_tokens

    assert default_prefill_from_tokens(prepacked, int8_decode=int8) == rows


def test_policies_in_pair_files_and_flags(tmp_path):
    from r2r_serve.cli import build_parser
    from r2r_serve.models.pair_config import PairConfigError, load_pair_config

    path = tmp_path / "split.toml"
    path.write_text('[slm]\nmodel = "x"\ndtype = { cpu = "bfloat16/float32" }\n[llm]\nmodel = "y"\n')
    assert load_pair_config(path).slm.dtype_for("cpu") == "bfloat16/float32"
    path.write_text('[slm]\nmodel = "x"\ndtype = "bfloat16/int8"\n[llm]\nmodel = "y"\n')
    with pytest.raises(PairConfigError, match="DECODE/PREFILL"):
        load_pair_config(path)
    args = build_parser().parse_args(["worker", "--role", "slm", "--model", "m", "--dtype", "bfloat16/float32",
                                      "--prefill-from-tokens", "8"])
    assert (args.dtype, args.prefill_from_tokens) == ("bfloat16/float32", 8)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--slm-dtype", "float32/fp8"])
