"""Tiny random SLM/LLM pairs with a shared tokenizer, built offline (no hub) for tests and demos.

`build_tiny_pair(dir)` writes `dir/tokenizer` (a byte-level BPE trained on a built-in corpus) and two
Qwen2-architecture models, `dir/slm` and `dir/llm`, both carrying that tokenizer, so every code path
(chat template, fingerprints, GetTokenizer) runs as it does with real weights.
"""

from __future__ import annotations

from pathlib import Path

_CORPUS = [
    "def reverse_string(s):\n    return s[::-1]\n",
    "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n        self.items.append(x)\n",
    "Write a Python function that reverses a string.",
    "The quick brown fox jumps over the lazy dog. Small models write most tokens; large models fix the few that matter.",
    "import os\nimport sys\n\nif __name__ == '__main__':\n    main()\n",
    "Hello, world! Ünïcödé text — naïve café, 日本語, emoji 🙂 so byte fallback is exercised.",
    "while True:\n    line = input()\n    if not line:\n        break\n",
    "You are a helpful assistant. Answer the question step by step.",
]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# A ChatML template (the Qwen family's), so chat requests render as they do with the real pair.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SLM_SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
LLM_SHAPE = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2)


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained on the built-in corpus; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, shape: dict, seed: int, max_positions: int = 1024, init_range: float = 0.2):
    """A random Qwen2 causal LM. A wide init range gives peaked, varied next-token distributions."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=max_positions,
                         initializer_range=init_range, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, rope_theta=10000.0, use_sliding_window=False, **shape)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model.eval()


def build_tiny_pair(out_dir: str | Path, slm_seed: int = 1, llm_seed: int = 2) -> dict[str, Path]:
    """Write tokenizer/, slm/ and llm/ under out_dir (idempotent); returns their paths."""
    out = Path(out_dir)
    paths = {name: out / name for name in ("tokenizer", "slm", "llm")}
    if all((p / "config.json").exists() or (p / "tokenizer.json").exists() for p in paths.values()):
        return paths
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(paths["tokenizer"])
    for name, shape, seed in (("slm", SLM_SHAPE, slm_seed), ("llm", LLM_SHAPE, llm_seed)):
        model = build_model(tokenizer, shape, seed)
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


if __name__ == "__main__":
    import sys

    for name, path in build_tiny_pair(sys.argv[1] if len(sys.argv) > 1 else "tiny-models").items():
        print(f"{name}: {path}")
