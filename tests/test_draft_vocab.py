"""The drafting head (worker/draft_vocab.py, `--draft-vocab N`): the SLM scores only its N most frequent tokens.
Anchors: the SLM alone on it is its own greedy generate() with the other tokens masked; verify mode at
rollback_below 1 on it is still the LLM's own generate() (lossless); HF assisted generation offered the same head
stays lossless too."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
import pytest_asyncio
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from conftest import worker_config
from r2r_serve.coordinator.app import start_coordinator
from r2r_serve.coordinator.servicer import CoordinatorSettings
from r2r_serve.testing import tiny
from r2r_serve.worker import draft_vocab
from r2r_serve.worker.app import start_worker
from r2r_serve.worker.draft_vocab import DraftHead, corpus_files, draft_token_ids, rank_tokens
from r2r_serve.worker.engine import ModelEngine
from test_anchors import PROMPTS, hf_generate, ids_of

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench
from bench.assisted import generate as assisted_generate, load_pair  # noqa: E402

KEEP = 160  # of the tiny vocabulary's 384: the random SLM's greedy choices often fall outside


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small corpus (the tiny tokenizer's own training text), so ranking takes milliseconds."""
    folder = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(tiny._CORPUS):
        (folder / f"{i:02d}.py").write_text(text)
    return folder


@pytest.fixture(scope="module")
def kept(hf, corpus) -> torch.Tensor:
    vocab = hf.slm.get_output_embeddings().out_features
    return draft_token_ids(hf.tokenizer, KEEP, vocab, always=[hf.tokenizer.eos_token_id], sources=corpus_files(corpus))


class KeepOnly(LogitsProcessor):
    """The reference for a drafting head: every other token's score -inf."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __call__(self, input_ids, scores):
        masked = torch.full_like(scores, float("-inf"))
        masked[:, self.ids] = scores[:, self.ids]
        return masked


def masked_generate(model, ids: list[int], max_new: int, eos: int, keep: torch.Tensor) -> list[int]:
    out = model.generate(torch.tensor([ids], device=model.device), max_new_tokens=max_new, do_sample=False,
                         eos_token_id=eos, pad_token_id=eos, logits_processor=LogitsProcessorList([KeepOnly(keep)]))
    gen = out[0, len(ids):].tolist()
    return gen[: gen.index(eos)] if eos in gen else gen


def test_the_ranking_is_a_deterministic_permutation_led_by_the_corpus(hf, corpus):
    sources = corpus_files(corpus)
    ranked = rank_tokens(hf.tokenizer, sources)
    assert ranked == rank_tokens(hf.tokenizer, sources)
    assert sorted(ranked) == list(range(len(hf.tokenizer)))
    counts: dict[int, int] = {}
    for text in tiny._CORPUS:
        for i in hf.tokenizer(text, add_special_tokens=False)["input_ids"]:
            counts[i] = counts.get(i, 0) + 1
    seeded = {i for text in draft_vocab.CHAT_SEED for i in hf.tokenizer(text, add_special_tokens=False)["input_ids"]}
    most = max((i for i in counts if i not in seeded), key=lambda i: (counts[i], -i))
    assert ranked.index(most) <= len(seeded)  # the most frequent token right after the chat seed
    with pytest.raises(FileNotFoundError):
        corpus_files(corpus / "missing")


def test_the_head_keeps_special_tokens_and_scores_kept_tokens_like_the_full_head(hf, kept):
    assert len(kept) >= KEEP and set(hf.tokenizer.all_special_ids) <= set(kept.tolist())
    full = hf.slm.get_output_embeddings()
    head = DraftHead(full, kept)
    hidden = torch.randn(2, 3, full.in_features, dtype=full.weight.dtype)
    with torch.inference_mode():
        want, got = full(hidden), head(hidden)
    assert got.shape == want.shape
    torch.testing.assert_close(got[..., kept], want[..., kept])
    dropped = torch.ones(full.out_features, dtype=torch.bool)
    dropped[kept] = False
    assert torch.isneginf(got[..., dropped]).all()
    assert head.proj.weight.data_ptr() != full.weight.data_ptr()  # a copy: a tied head stays whole


@pytest_asyncio.fixture(scope="module")
async def drafting_services(services, tiny_pair, corpus):
    """An SLM worker on a drafting head, and a coordinator on it with the shared LLM worker and router."""
    slm = await start_worker(worker_config(tiny_pair["slm"], "slm", draft_vocab=KEEP, draft_vocab_corpus=str(corpus)))
    coord = await start_coordinator(f"127.0.0.1:{slm.port}", services.llm_target,
                                    services.coord.servicer.router.endpoint, CoordinatorSettings())
    from r2r_client import AsyncR2RClient

    try:
        async with AsyncR2RClient(f"127.0.0.1:{coord.port}") as client:
            yield client
    finally:
        await coord.stop(0.5)
        await slm.stop(0.5)


async def test_the_slm_alone_on_a_drafting_head_is_its_masked_generate(drafting_services, hf, kept):
    eos = hf.tokenizer.eos_token_id
    differs = 0
    for prompt in PROMPTS[:3]:
        result = await drafting_services.generate(prompt, max_tokens=24, threshold=1.5)
        assert result.token_ids == masked_generate(hf.slm, ids_of(hf, prompt), 24, eos, kept)
        assert set(result.token_ids) <= set(kept.tolist())
        differs += result.token_ids != hf_generate(hf.slm, ids_of(hf, prompt), 24, eos)
    assert differs, "the drafting head changed no answer: the test would not see it working"


async def test_verify_mode_on_a_drafting_head_is_still_the_llm_generate(drafting_services, hf):
    """Lossless: the LLM judges every SLM token, so where the head hid the SLM's choice only a draft is lost."""
    prompts = PROMPTS[:3]
    results = await asyncio.gather(*(drafting_services.generate(p, max_tokens=16, threshold=1.5, rollback_below=1.0,
                                                                max_draft_tokens=3) for p in prompts))
    for prompt, result in zip(prompts, results):
        assert result.token_ids == hf_generate(hf.llm, ids_of(hf, prompt), 16, hf.tokenizer.eos_token_id)
        assert result.stats.verify_passes >= 1


def test_only_the_slm_takes_a_drafting_head(tiny_pair):
    with pytest.raises(ValueError, match="SLM"):
        ModelEngine(worker_config(tiny_pair["llm"], "llm", draft_vocab=KEEP)).load()
    with pytest.raises(ValueError, match=">= 0"):
        ModelEngine(worker_config(tiny_pair["slm"], "slm", draft_vocab=-1)).load()


def test_assisted_generation_offered_the_head_stays_lossless(tiny_pair, corpus, monkeypatch):
    monkeypatch.setattr(draft_vocab, "stdlib_sources", lambda: corpus_files(corpus))
    pair = load_pair(tiny_pair["slm"], tiny_pair["llm"], slm_dtype="float64", llm_dtype="float64",
                     slm_draft_vocab=KEEP)
    assert set(pair.assistant_heads) == {"full", "draft"}
    assert isinstance(pair.slm.get_output_embeddings(), DraftHead)  # drafts on it unless asked otherwise
    messages = [{"role": "user", "content": PROMPTS[1]}]
    alone = assisted_generate(pair, messages, 32, "llm")
    for head in ("draft", "full"):
        assert assisted_generate(pair, messages, 32, "assisted", assistant_head=head).token_ids == alone.token_ids


def test_serve_passes_the_flag_to_the_slm_worker_only(monkeypatch):
    from r2r_serve import launcher

    started = []

    class Cluster:
        def start(self, name, argv, **kw):
            started.append((name, argv))
            return f"127.0.0.1:{len(started)}"

    monkeypatch.setattr(launcher, "start_router_and_coordinator", lambda *a, **k: ("r", "c"))
    launcher.start_deployment(Cluster(), slm="s", llm="l", slm_dtype="bfloat16", llm_dtype="bfloat16",
                              slm_draft_vocab=49152, say=lambda *a, **k: None)
    argv = dict(started)
    assert argv["slm"][argv["slm"].index("--draft-vocab") + 1] == "49152"
    assert "--draft-vocab" not in argv["llm"]
    from r2r_serve.cli import build_parser

    assert build_parser().parse_args(["serve", "--slm-draft-vocab", "32768"]).slm_draft_vocab == 32768
