"""`--quantize int8-weight`'s layers (worker/int8_weights.py): int8 weights for short inputs, the dense weights
for long ones. The served anchors (threshold > 1 / 0 = the quantized models' own generate()) are in
test_quantize.py, for every scheme."""

from __future__ import annotations


import pytest
import torch

from r2r_serve.worker.engine import check_quantize
from r2r_serve.worker.int8_weights import Int8WeightLinear, int8_weights_available, quantize_int8_weights

pytestmark = pytest.mark.skipif(not int8_weights_available(), reason="no int8 kernel")


def test_short_inputs_use_int8_and_long_ones_the_dense_weight():
    gen = torch.Generator().manual_seed(0)
    dense = torch.nn.Linear(64, 48, dtype=torch.float32)
    layer = Int8WeightLinear(dense, max_rows=4)
    q = layer.qweight.float() * layer.scales[:, None]
    assert layer.qweight.dtype == torch.int8 and (layer.qweight.abs() <= 127).all()
    # the int8 weight is close to the dense one (one rounding step per channel at most)
    assert ((q - dense.weight).abs() <= layer.scales[:, None] / 2 + 1e-7).all()
    with torch.inference_mode():
        short = torch.randn(1, 3, 64, generator=gen)
        assert torch.allclose(layer(short), torch.nn.functional.linear(short, q, dense.bias), rtol=1e-4, atol=1e-5)
        assert not torch.equal(layer(short), dense(short))  # really the int8 weight
        long = torch.randn(2, 2, 64, generator=gen)  # 4 rows: the dense kernel, bit for bit
        assert torch.equal(layer(long), dense(long))
        bf16 = Int8WeightLinear(torch.nn.Linear(64, 48, dtype=torch.bfloat16))  # the CPU's usual decode dtype
        x = short.to(torch.bfloat16)
        ref = torch.nn.functional.linear(x.float(), bf16.qweight.float() * bf16.scales.float()[:, None],
                                         bf16.bias.float())
        assert bf16(x).dtype == torch.bfloat16 and torch.allclose(bf16(x).float(), ref, rtol=0.02, atol=0.02)


def test_layers_the_kernel_cannot_take_stay_dense():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 60), torch.nn.Linear(60, 16),
                                torch.nn.Linear(16, 16, dtype=torch.float64))
    assert quantize_int8_weights(model) == 2  # 60 inputs (not a multiple of 16) and float64 stay plain
    assert [type(m).__name__ for m in model] == ["Int8WeightLinear", "Int8WeightLinear", "Linear", "Linear"]


def test_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="CPU only"):
        check_quantize("int8-weight", "cuda", "bfloat16")
    with pytest.raises(ValueError, match="float64"):
        check_quantize("int8-weight", "cpu", "float64")
    for ok in ("bfloat16", "float32", "bfloat16/float32"):
        check_quantize("int8-weight", "cpu", ok)


def test_serve_flags_take_int8_weight():
    from r2r_serve.cli import build_parser

    args = build_parser().parse_args(["serve", "--slm-quantize", "int8-weight", "--llm-quantize", "int8-weight"])
    assert (args.slm_quantize, args.llm_quantize) == ("int8-weight", "int8-weight")


@pytest.mark.parametrize("flags, dtype, rows", [
    ({"avx2", "fma"}, torch.bfloat16, None),            # AVX2 only: the int8 kernel wins at every length
    ({"avx2", "avx512_bf16"}, torch.bfloat16, 8),       # bf16 units: dense bf16 GEMMs win from 8 rows
    ({"avx2", "amx_bf16"}, torch.bfloat16, 8),
    ({"avx2", "fma"}, torch.float32, 8),                # fp32 activations: the int8 kernel is slow
])
def test_the_row_limit_follows_the_cpu_and_the_dtype(monkeypatch, flags, dtype, rows):
    from r2r_serve.common import cpu

    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
    linear = torch.nn.Linear(64, 48, dtype=dtype)
    layer = Int8WeightLinear(linear)
    assert layer.max_rows == rows
    assert (layer.weight is None) == (rows is None), "the dense weight is kept only where it can be read"
    with torch.inference_mode():
        long = torch.randn(40, 64, dtype=dtype)
        # 40 rows: int8 when there is no limit (so not the dense result), dense bit for bit under one
        assert torch.equal(layer(long), linear(long)) == (rows is not None)
        if rows is None:  # another dtype still works, through the int8 weights
            assert layer(long.float()).dtype == torch.float32


def test_a_tied_head_keeps_its_dense_weight_without_a_row_limit():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    assert quantize_int8_weights(model, max_rows=None) == 8  # q, k, v, o, gate, up, down, head
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight is embedding.weight
    assert model.model.layers[0].mlp.up_proj.weight is None
