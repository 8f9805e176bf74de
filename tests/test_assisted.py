"""bench/assisted.py: HF assisted generation (the lossless speculative-decoding baseline) on the tiny pair."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(ROOT))

from bench.assisted import (MODES, StopStrings, _until_eos, generate, load_pair, main,  # noqa: E402
                            prompt_ids)
from r2r_serve.coordinator.requests import Limits, prompt_ids as coordinator_prompt_ids  # noqa: E402
from r2r_serve.proto import coordinator_pb2  # noqa: E402

# The first ends with EOS after 81 tokens on the tiny pair; the others run to the limit.
PROMPTS = ["Write a Python function that reverses a string.", "def add(a, b):", "Explain recursion."]
MAX_TOKENS = 96


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: see conftest


@pytest.fixture(scope="module", params=["float32", "float64"])
def pair(request, tiny_pair):
    return load_pair(tiny_pair["slm"], tiny_pair["llm"], slm_dtype=request.param, llm_dtype=request.param)


def test_assisted_is_lossless(pair):
    """Greedy assisted generation gives the LLM's own greedy tokens (float32 too, on this pair)."""
    for text in PROMPTS:
        assisted = generate(pair, chat(text), MAX_TOKENS, "assisted")
        alone = generate(pair, chat(text), MAX_TOKENS, "llm")
        assert assisted.token_ids == alone.token_ids and assisted.text == alone.text
    slm = generate(pair, chat(PROMPTS[1]), MAX_TOKENS, "slm")
    assert slm.token_ids != generate(pair, chat(PROMPTS[1]), MAX_TOKENS, "llm").token_ids  # a different model


def test_llm_mode_is_the_models_own_generate(hf, tiny_pair):
    pair = load_pair(tiny_pair["slm"], tiny_pair["llm"], slm_dtype="float64", llm_dtype="float64")
    eos = hf.tokenizer.eos_token_id
    for text in PROMPTS:
        ids = prompt_ids(pair.tokenizer, chat(text))
        want = hf.llm.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=MAX_TOKENS)[0, len(ids):].tolist()
        got = generate(pair, chat(text), MAX_TOKENS, "llm")
        assert got.token_ids == _until_eos(want, [eos])
    # And the SLM's, in slm mode.
    ids = prompt_ids(pair.tokenizer, chat(PROMPTS[1]))
    want = hf.slm.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=MAX_TOKENS)[0, len(ids):].tolist()
    assert generate(pair, chat(PROMPTS[1]), MAX_TOKENS, "slm").token_ids == _until_eos(want, [eos])


def test_prompt_is_the_coordinators(pair):
    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi ü"}]
    req = coordinator_pb2.GenerateRequest(chat=coordinator_pb2.ChatInput(
        messages=[coordinator_pb2.ChatMessage(**m) for m in messages]))
    limits = Limits(max_prompt_tokens=1000, max_new_tokens=100, default_max_tokens=10, context=1024, vocab_size=384)
    assert prompt_ids(pair.tokenizer, messages) == coordinator_prompt_ids(req, pair.tokenizer, limits)


def test_stats_are_consistent(pair):
    ended = generate(pair, chat(PROMPTS[0]), MAX_TOKENS, "llm")  # stops at EOS on this pair
    assert 0 < ended.completion_tokens < MAX_TOKENS
    assert pair.eos_token_ids and not set(ended.token_ids) & set(pair.eos_token_ids)
    for mode in MODES:
        r = generate(pair, chat(PROMPTS[1]), 16, mode)
        assert r.completion_tokens == len(r.token_ids) == 16
        assert 0 < r.ttft_s <= r.total_s
        assert r.tokens_per_s == pytest.approx(r.completion_tokens / r.total_s)
        assert r.text == pair.tokenizer.decode(r.token_ids, skip_special_tokens=True,
                                               clean_up_tokenization_spaces=False)


def test_stop_strings_end_the_answer_like_the_service(pair):
    decode = lambda ids: pair.tokenizer.decode(ids, skip_special_tokens=True,  # noqa: E731
                                               clean_up_tokenization_spaces=False)
    full = generate(pair, chat(PROMPTS[1]), MAX_TOKENS, "llm")
    stop = full.text[40:43]
    cut = full.text.find(stop)
    assert cut > 0 and stop.strip()
    for mode in ("assisted", "llm"):
        r = generate(pair, chat(PROMPTS[1]), MAX_TOKENS, mode, stop=[stop, "never-said"])
        # The service counts the token that completes the stop string and cuts the text before it.
        assert r.text == full.text[:cut]
        assert r.token_ids == full.token_ids[:r.completion_tokens]
        assert stop in decode(r.token_ids) and stop not in decode(r.token_ids[:-1])
        assert r.tokens_per_s == pytest.approx(r.completion_tokens / r.total_s)
    assert generate(pair, chat(PROMPTS[1]), MAX_TOKENS, "llm", stop=["never-said"]).token_ids == full.token_ids


def test_stop_found_inside_a_verified_chunk(pair):
    """Assisted decoding adds several tokens per step: a stop string among them, not at the end, counts."""
    ids = pair.tokenizer("x = 1\nprint(x)\n# done", add_special_tokens=False)["input_ids"]
    prompt_len = 2
    criteria = StopStrings(pair.tokenizer, prompt_len, ["print"])
    assert not bool(criteria(torch.tensor([ids[:prompt_len + 1]]))[0])
    assert bool(criteria(torch.tensor([ids]))[0])  # "print" is mid-chunk here
    assert not bool(StopStrings(pair.tokenizer, prompt_len, ["absent"])(torch.tensor([ids]))[0])


def test_until_eos_and_errors(pair, tmp_path):
    assert _until_eos([5, 6, 2, 7, 2], [2, 9]) == [5, 6]
    assert _until_eos([5, 6], [2]) == [5, 6] and _until_eos([9], [2, 9]) == []
    with pytest.raises(ValueError, match="unknown mode"):
        generate(pair, chat("x"), 4, "speculative")
    with pytest.raises(ValueError, match="max_tokens"):
        generate(pair, chat("x"), 0, "llm")
    with pytest.raises(FileNotFoundError, match="not a local model folder"):
        load_pair(tmp_path / "missing", tmp_path / "missing")


def test_main_prints_the_table(tiny_pair, capsys):
    assert main(["--slm", str(tiny_pair["slm"]), "--llm", str(tiny_pair["llm"]), "--prompt", PROMPTS[1],
                 "--max-tokens", "8", "--no-warmup"]) == 0
    out = capsys.readouterr().out
    for word in ("assisted", "llm", "slm", "TTFT", "tok/s"):
        assert word in out
