"""float32 CPU linears on oneDNN prepacked weights (worker/prepack.py), the workers' default.

Same math as nn.Linear with another kernel blocking: a prepacked float32 engine must choose the tokens a plain
float32 engine chooses, with log-probs and router features within float32 rounding, through prefills, grouped
and ragged decode batches and catch-ups; the split policy's automatic crossover follows the packing.
"""

from __future__ import annotations

import pytest
import torch

from conftest import worker_config
from r2r_serve.worker.engine import ModelEngine
from r2r_serve.worker.prepack import PrepackedLinear, prepack_available, prepack_linears
from test_dtype_policy import Driver

pytestmark = pytest.mark.skipif(not prepack_available(), reason="this torch build has no oneDNN linear prepack")


def _engine(path, dtype: str, **kw) -> ModelEngine:
    engine = ModelEngine(worker_config(path, "slm", **kw))
    engine.config.dtype = dtype
    engine.load()
    return engine


def test_prepacked_linear_is_a_linear():
    gen = torch.Generator().manual_seed(1)
    for bias in (True, False):
        lin = torch.nn.Linear(40, 24, bias=bias)
        packed = PrepackedLinear(lin)
        for shape in ((1, 40), (7, 40), (2, 5, 40)):
            x = torch.randn(*shape, generator=gen)
            with torch.inference_mode():
                torch.testing.assert_close(packed(x), lin(x), rtol=1e-5, atol=1e-6)


def test_only_float32_cpu_linears_are_packed(tiny_pair):
    from transformers import AutoModelForCausalLM

    f64 = AutoModelForCausalLM.from_pretrained(str(tiny_pair["slm"]), dtype=torch.float64)
    assert prepack_linears(f64) == 0
    f32 = AutoModelForCausalLM.from_pretrained(str(tiny_pair["slm"]), dtype=torch.float32)
    linears = sum(type(m) is torch.nn.Linear for m in f32.modules())
    assert prepack_linears(f32) == linears > 0
    assert not any(type(m) is torch.nn.Linear for m in f32.modules())


def test_prepacked_engine_matches_a_plain_float32_engine(tiny_pair):
    packed = _engine(tiny_pair["slm"], "float32")
    plain = _engine(tiny_pair["slm"], "float32", prepack=False)
    assert packed.prepacked > 0 and plain.prepacked == 0
    assert any(isinstance(m, PrepackedLinear) for m in packed.model.modules())
    d = Driver(packed, plain, tol=1e-5)
    d.run([("a", list(range(5, 17))), ("b", list(range(40, 47)))])
    for _ in range(5):
        d.run([("a", None), ("b", None)])
    d.run([("c", list(range(100, 121))), ("a", [3, 4, 5]), ("b", None)])
    for _ in range(3):
        d.run([(s, None) for s in "abc"])
    d.run([("c", None)])


def test_split_crossover_follows_the_packing(tiny_pair):
    assert _engine(tiny_pair["slm"], "float64/float32").prefill_from == 2   # packed fp32 wins from 2 rows
    assert _engine(tiny_pair["slm"], "float64/float32", prepack=False).prefill_from == 6
    assert _engine(tiny_pair["slm"], "float64/float32", prefill_from_tokens=5).prefill_from == 5
