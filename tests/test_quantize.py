"""`--quantize int8` (dynamic int8 linear layers) and `int8-weight` (int8 weights for short forwards) in a CPU
worker. The outputs move away from the float model (bench/forward_costs.py measures how far), but the
service must stay self-consistent: with threshold > 1 it is the quantized SLM's own greedy generate(), with
threshold 0 the quantized LLM's, token for token."""

from __future__ import annotations

import argparse
import types

import pytest
import pytest_asyncio
import torch

from conftest import TOP_K
from r2r_serve.coordinator.app import start_coordinator
from r2r_serve.launcher import start_deployment
from r2r_serve.router.app import start_router
from r2r_serve.worker.app import start_worker
from r2r_serve.worker.engine import EngineConfig, ModelEngine, check_quantize, quantize_model
from r2r_serve.worker.int8_weights import Int8WeightLinear, int8_weights_available

PROMPTS = ["Write a Python function that reverses a string", "def add(a, b):", "class Stack:"]


def quantized_config(path, role: str, quantize: str = "int8") -> EngineConfig:
    # float32: the quantized layers take float32 activations (the other tests' float64 would be refused)
    return EngineConfig(model=str(path), role=role, dtype="float32", features_top_k=TOP_K, quantize=quantize)


def quantized_reference(path, quantize: str = "int8"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    assert quantize_model(model, quantize) > 0
    return model


def quantized_hf(tiny_pair, quantize: str) -> types.SimpleNamespace:
    """The tiny pair loaded plainly with transformers and quantized as a worker quantizes them."""
    from transformers import AutoTokenizer

    return types.SimpleNamespace(slm=quantized_reference(tiny_pair["slm"], quantize),
                                 llm=quantized_reference(tiny_pair["llm"], quantize),
                                 tokenizer=AutoTokenizer.from_pretrained(str(tiny_pair["slm"])))


async def quantized_services(tiny_pair, quantize: str):
    """Quantized SLM and LLM workers, an entropy router and a coordinator; yields their handles."""
    slm = await start_worker(quantized_config(tiny_pair["slm"], "slm", quantize))
    llm = await start_worker(quantized_config(tiny_pair["llm"], "llm", quantize))
    router = await start_router("entropy")
    coord = await start_coordinator(f"127.0.0.1:{slm.port}", f"127.0.0.1:{llm.port}", f"127.0.0.1:{router.port}")
    yield types.SimpleNamespace(slm=slm, llm=llm, target=f"127.0.0.1:{coord.port}")
    for handle in (coord, router, slm, llm):
        await handle.stop(0.5)


SCHEMES = ["int8", pytest.param("int8-weight", marks=pytest.mark.skipif(
    not int8_weights_available(), reason="this torch has no weight-only int8 kernel"))]


@pytest_asyncio.fixture(scope="module", params=SCHEMES)
async def quantized(request, tiny_pair):
    """Per --quantize scheme: its services and the reference models quantized the same way."""
    hf = quantized_hf(tiny_pair, request.param)
    async for services in quantized_services(tiny_pair, request.param):
        yield types.SimpleNamespace(scheme=request.param, services=services, hf=hf)


def hf_generate(model, ids: list[int], max_new: int, eos: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos)
    gen = out[0, len(ids):].tolist()
    return gen[: gen.index(eos)] if eos in gen else gen


QUANTIZED_LAYER = {"int8": torch.ao.nn.quantized.dynamic.Linear, "int8-weight": Int8WeightLinear}


async def test_the_workers_really_run_quantized_layers(quantized):
    layer = QUANTIZED_LAYER[quantized.scheme]
    for handle in (quantized.services.slm, quantized.services.llm):
        engine = handle.servicer.engine
        assert not any(type(m) is torch.nn.Linear for m in engine.model.modules())
        assert any(isinstance(m, layer) for m in engine.model.modules())
        assert isinstance(engine.decode_weights.lm_head, layer)


@pytest.mark.parametrize("prompt", PROMPTS)
async def test_threshold_above_one_is_the_quantized_slm_generate(quantized, prompt):
    from r2r_client import AsyncR2RClient

    hf = quantized.hf
    ids = hf.tokenizer(prompt)["input_ids"]
    async with AsyncR2RClient(quantized.services.target) as client:
        result = await client.generate(prompt, max_tokens=24, threshold=1.5)
    assert result.token_ids == hf_generate(hf.slm, ids, 24, hf.tokenizer.eos_token_id)
    assert set(result.sources) <= {"slm"}


@pytest.mark.parametrize("prompt", PROMPTS[:2])
async def test_threshold_zero_is_the_quantized_llm_generate(quantized, prompt):
    from r2r_client import AsyncR2RClient

    hf = quantized.hf
    ids = hf.tokenizer(prompt)["input_ids"]
    async with AsyncR2RClient(quantized.services.target) as client:
        result = await client.generate(prompt, max_tokens=24, threshold=0.0, ignore_eos=False)
    assert result.token_ids == hf_generate(hf.llm, ids, 24, hf.tokenizer.eos_token_id)
    assert set(result.sources) <= {"llm"}


def test_refused_on_cuda_and_outside_float32(tiny_pair):
    with pytest.raises(ValueError, match="CPU only"):
        check_quantize("int8", "cuda", "float32")
    with pytest.raises(ValueError, match="CPU only"):
        check_quantize("int8", "cuda:1", "bfloat16")
    with pytest.raises(ValueError, match="float32"):
        check_quantize("int8", "cpu", "bfloat16")
    with pytest.raises(ValueError, match="unknown quantize"):
        check_quantize("int4", "cpu", "float32")
    check_quantize("none", "cuda", "bfloat16")
    # the engine refuses before loading anything (so this needs no GPU)
    engine = ModelEngine(EngineConfig(model=str(tiny_pair["slm"]), role="slm", device="cuda", dtype="float32",
                                      quantize="int8"))
    with pytest.raises(ValueError, match="CPU only"):
        engine.load()
    assert engine.model is None


def test_worker_flag_and_serve_flags_reach_the_workers(tmp_path):
    from r2r_serve.cli import build_parser, main
    from r2r_serve.worker.app import add_worker_args, config_from_args

    p = argparse.ArgumentParser()
    add_worker_args(p)
    assert config_from_args(p.parse_args(["--role", "slm", "--model", str(tmp_path), "--quantize", "int8"])).quantize \
        == "int8"
    assert config_from_args(p.parse_args(["--role", "slm", "--model", str(tmp_path)])).quantize == "none"

    started = {}

    class FakeCluster:
        def start(self, name, args, port=None, env=None, **kw):
            started[name] = args
            return f"127.0.0.1:{len(started)}"

    start_deployment(FakeCluster(), slm="s", llm="l", slm_dtype="float32", llm_dtype="float32",
                     llm_quantize="int8", say=lambda *a, **k: None)
    assert "--quantize" not in started["slm"]
    assert started["llm"][started["llm"].index("--quantize") + 1] == "int8"

    args = build_parser().parse_args(["serve", "--slm-quantize", "int8", "--llm-quantize", "none"])
    assert (args.slm_quantize, args.llm_quantize) == ("int8", "none")
    # `r2r serve` refuses int8 on a GPU before starting anything
    assert main(["serve", "--tiny", str(tmp_path / "tiny"), "--device", "cuda", "--llm-quantize", "int8"]) == 2
