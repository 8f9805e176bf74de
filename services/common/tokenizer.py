"""Tokenizer identity and transport: a fingerprint that two models must share, and the files that let a
coordinator on another node load exactly the workers' tokenizer."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

TOKENIZER_FILE_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                        "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
                        "added_tokens.json", "generation_config.json")


def fingerprint(tokenizer) -> str:
    """sha256 of what decides token ids: the vocabulary (added tokens included) and the special tokens."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    specials = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    h.update(json.dumps(specials, sort_keys=True).encode())
    return h.hexdigest()[:32]


def tokenizer_files(tokenizer, model_dir: str | Path | None = None) -> dict[str, bytes]:
    """The files a tokenizer needs, as bytes (what save_pretrained writes, plus generation_config.json
    from the model folder when there is one, for its eos ids)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    if model_dir is not None:
        gen = Path(model_dir) / "generation_config.json"
        if gen.is_file():
            files["generation_config.json"] = gen.read_bytes()
    return files


def load_tokenizer_from_files(files: dict[str, bytes], into: str | Path | None = None):
    """Write the files to a folder and load them with AutoTokenizer (no hub access)."""
    from transformers import AutoTokenizer

    folder = Path(into) if into is not None else Path(tempfile.mkdtemp(prefix="r2r-tokenizer-"))
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if "/" in name or name.startswith("."):
            raise ValueError(f"refusing tokenizer file name {name!r}")
        (folder / name).write_bytes(data)
    return AutoTokenizer.from_pretrained(str(folder))
