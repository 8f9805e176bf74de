"""Model pairs as config files (issue #3): the packaged default pair, custom pair files, what `r2r serve`
and `r2r router` take from them, chat-template options, and the shipped router for the default pair."""

from __future__ import annotations

import pytest

from r2r_serve.cli import build_parser, serve_plan
from r2r_serve.coordinator.requests import ChatOptions, Limits, prompt_ids
from r2r_serve.models.pair_config import (DEFAULT_PAIR_NAME, PairConfigError, auto_dtype, available_pairs,
                                          load_pair_config)
from r2r_serve.proto import coordinator_pb2
from r2r_serve.router.app import strategy_from_args
from r2r_serve.router.checkpoint import load_checkpoint


def write_pair(tmp_path, tiny_pair, router: str = 'strategy = "entropy"', chat: str = "", extra: str = ""):
    path = tmp_path / "tiny.toml"
    path.write_text(f'''name = "tiny"
[slm]
model = "{tiny_pair['slm']}"
dtype = {{ cpu = "float64", cuda = "bfloat16" }}
[llm]
model = "{tiny_pair['llm']}"
dtype = "float32"
[router]
{router}
{extra}
[chat]
{chat}
''')
    return path


def test_the_default_pair_is_packaged_with_its_trained_router():
    assert DEFAULT_PAIR_NAME in available_pairs()
    pair = load_pair_config()
    assert pair.slm.model == "qwen2.5-coder-0.5b-instruct" and pair.llm.model == "qwen2.5-coder-1.5b-instruct"
    assert pair.router_strategy == "neural"
    meta = load_checkpoint(pair.router_checkpoint).meta
    assert meta.slm_name == "Qwen2.5-Coder-0.5B-Instruct" and meta.llm_name == "Qwen2.5-Coder-1.5B-Instruct"
    assert pair.slm.dtype_for("cuda:0") == "bfloat16"


def test_the_shipped_router_beats_the_entropy_baseline_on_its_validation_data():
    """The checkpoint records both on the same held-out sequences: at every LLM share the trained router
    must catch more divergent tokens than the training-free entropy router (else entropy should be default)."""
    meta = load_checkpoint(load_pair_config().router_checkpoint).meta
    metrics = meta.training["metrics"]
    assert meta.training["data"]["positions"] >= 100_000
    assert metrics["val_auc"] > metrics["entropy_baseline_at_equal_share"]["auc"]
    for share in ("0.05", "0.1", "0.15", "0.2"):
        assert metrics["at_share"][f"share_{share}"]["recall"] > metrics["entropy_baseline_at_share"][f"share_{share}"]["recall"]


def test_serve_plan_follows_a_pair_file_and_flags_override_it(tmp_path, tiny_pair):
    path = write_pair(tmp_path, tiny_pair, extra="threshold = 0.3", chat='system_prompt = "Be brief."\n'
                      'template_kwargs = { add_notes = false }')
    plan = serve_plan(build_parser().parse_args(["serve", "--pair", str(path)]))
    assert (plan.slm, plan.llm) == (str(tiny_pair["slm"]), str(tiny_pair["llm"]))
    assert (plan.slm_dtype, plan.llm_dtype) == ("float64", "float32")
    assert plan.router_strategy == "entropy" and plan.threshold == 0.3
    assert plan.coordinator_args == ["--system-prompt", "Be brief.", "--chat-template-kwargs", '{"add_notes": false}']
    plan = serve_plan(build_parser().parse_args(["serve", "--pair", str(path), "--llm-dtype", "float64",
                                                 "--router-strategy", "top1", "--threshold", "0.5"]))
    assert plan.llm_dtype == "float64" and plan.router_strategy == "top1" and plan.threshold == 0.5
    plan = serve_plan(build_parser().parse_args(["serve", "--pair", str(path), "--llm-prefetch-min-tokens", "16"]))
    assert plan.coordinator_args[:2] == ["--llm-prefetch-min-tokens", "16"]


def test_the_pairs_router_is_used_only_with_the_pairs_own_slm(tmp_path, tiny_pair):
    path = write_pair(tmp_path, tiny_pair, router='strategy = "top1"')
    plan = serve_plan(build_parser().parse_args(["serve", "--pair", str(path), "--slm", str(tiny_pair["llm"])]))
    assert plan.router_strategy == "auto"  # another SLM: its features don't fit this pair's router


def test_explicit_models_without_a_pair_use_no_pair_file(tiny_pair):
    plan = serve_plan(build_parser().parse_args(["serve", "--slm", str(tiny_pair["slm"]), "--llm", str(tiny_pair["llm"]),
                                                 "--slm-dtype", "float32"]))
    assert plan.pair == "" and plan.router_strategy == "auto" and plan.router_checkpoint is None
    assert plan.llm_dtype == auto_dtype("cpu")


@pytest.mark.parametrize("body, words", [
    ('[llm]\nmodel = "x"\n', "[slm] needs model"),
    ('[slm]\nmodel = "x"\ndtype = "int3"\n[llm]\nmodel = "y"\n', "dtype"),
    ('[slm]\nmodel = "x"\n[llm]\nmodel = "y"\n[router]\ncheckpoint = "nowhere.safetensors"\n', "does not exist"),
    ('[slm]\nmodel = "x"\n[llm]\nmodel = "y"\n[router]\nthreshold = -1\n', "threshold"),
    ("this is = not toml [", "TOML"),
])
def test_a_bad_pair_file_is_refused_with_a_reason(tmp_path, body, words):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(PairConfigError, match="bad.toml") as err:
        load_pair_config(path)
    assert words in str(err.value)


def test_an_unknown_pair_name_lists_the_known_ones():
    with pytest.raises(PairConfigError, match="qwen2.5-coder"):
        load_pair_config("no-such-pair")


def test_router_takes_the_pairs_router_unless_told_otherwise(tmp_path, tiny_pair):
    path = write_pair(tmp_path, tiny_pair, router='strategy = "top1"')
    assert strategy_from_args(build_parser().parse_args(["router", "--pair", str(path)])) == ("top1", None)
    assert strategy_from_args(build_parser().parse_args(["router", "--pair", str(path), "--strategy", "entropy"])) \
        == ("entropy", None)
    strategy, checkpoint = strategy_from_args(build_parser().parse_args(["router", "--pair", DEFAULT_PAIR_NAME]))
    assert strategy == "neural" and checkpoint.endswith("qwen2.5-coder-0.5b-instruct.safetensors")


def test_chat_options_add_a_system_message_only_when_the_request_has_none(hf):
    tok = hf.tokenizer
    limits = Limits(max_prompt_tokens=4096, max_new_tokens=64, default_max_tokens=16, context=4096,
                    vocab_size=len(tok))
    req = coordinator_pb2.GenerateRequest()
    req.chat.messages.add(role="user", content="Reverse a string.")
    chat = ChatOptions(system_prompt="Be brief.")
    expected = tok(tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Reverse a string."}],
                                           add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    assert prompt_ids(req, tok, limits, chat) == expected["input_ids"]
    assert prompt_ids(req, tok, limits) != prompt_ids(req, tok, limits, chat)
    own = coordinator_pb2.GenerateRequest()
    own.chat.messages.add(role="system", content="Be verbose.")
    own.chat.messages.add(role="user", content="Reverse a string.")
    assert prompt_ids(own, tok, limits, chat) == prompt_ids(own, tok, limits)
