"""Shared pieces of the labeling stages: model loading, batched forwards with explicit masks, greedy
decoding over a KV cache, resumable part files, progress display and stage summaries."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from r2r_serve.common.logging import get_logger

log = get_logger(__name__)


# ---- models --------------------------------------------------------------------------------------
@dataclass
class LM:
    """A causal LM split the way the serving worker uses it: decoder (final-norm output), head, embedding."""

    model: object
    tokenizer: object
    path: str
    name: str

    @property
    def base(self):
        return getattr(self.model, self.model.base_model_prefix)

    @property
    def lm_head(self):
        return self.model.get_output_embeddings()

    @property
    def embedding(self):
        return self.model.get_input_embeddings()

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def vocab_size(self) -> int:
        return self.embedding.num_embeddings

    def eos_ids(self) -> set[int]:
        ids = set()
        gen = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for value in (gen, self.tokenizer.eos_token_id):
            if value is not None:
                ids.update(value if isinstance(value, (list, tuple)) else [value])
        return {int(i) for i in ids}

    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = min(self.eos_ids()) if self.eos_ids() else 0
        return int(pad)


def auto_dtype(device: str, dtype: str) -> str:
    """float32 on CPU (multi-token forwards in bf16 are 4-5x slower without bf16 instructions), bf16 on GPUs."""
    if dtype != "auto":
        return dtype
    return "float32" if str(device).startswith("cpu") else "bfloat16"


def load_lm(path: str, device: str = "cpu", dtype: str = "float32") -> LM:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r2r_serve.common.tensors import parse_dtype

    if not Path(path).exists() and os.environ.get("HF_HUB_OFFLINE", "1") == "1":
        raise FileNotFoundError(f"model {path!r} is not a local folder and the hub is offline "
                                "(run `r2r models prepare`, or pass a local Hugging Face folder)")
    started = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(auto_dtype(device, dtype)))
    model = model.to(device).eval()
    name = str(getattr(model.config, "_name_or_path", "") or path)
    log.info("training_model_loaded", model=path, dtype=str(model.dtype), load_s=round(time.perf_counter() - started, 1))
    return LM(model=model, tokenizer=tok, path=str(path), name=Path(path).name if Path(path).exists() else name)


def model_name(path: str) -> str:
    """A readable model name for metadata: the prepared registry's display name when known."""
    try:
        from r2r_serve.models.registry import find_entry

        p = Path(path)
        for candidate in (p.name, str(path)):
            entry = find_entry(candidate)
            if entry is not None:
                return entry.display_name
    except Exception:  # noqa: BLE001 - names are informational
        pass
    return Path(path).name or str(path)


def render_chat(tokenizer, user_text: str, system: str | None = None) -> list[int]:
    """Prompt ids as the coordinator builds them for chat requests (the model's chat template)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_text}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(user_text, add_special_tokens=False)["input_ids"])


# ---- batched forwards -------------------------------------------------------------------------
def left_padded(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [B, N], attention mask [B, N], position ids [B, N] for left-padded rows."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, n - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[b, n - len(r):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def right_padded(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[b, : len(r)] = 1
    return ids.to(device), mask.to(device)


def kv_left_padded(cache_layers: list[tuple[torch.Tensor, torch.Tensor]], rows: list[int], lengths: list[int]):
    """Per-layer (k, v) for the given batch rows of a right-padded cache, cropped to `lengths` tokens each
    and left-padded to the longest: ([(k [M, h, P, d], v)], mask [M, P])."""
    P = max(lengths)
    layers = []
    for k0, v0 in cache_layers:
        k = k0.new_zeros((len(rows), k0.shape[1], P, k0.shape[3]))
        v = v0.new_zeros((len(rows), v0.shape[1], P, v0.shape[3]))
        for m, (b, n) in enumerate(zip(rows, lengths)):
            k[m, :, P - n:] = k0[b, :, :n]
            v[m, :, P - n:] = v0[b, :, :n]
        layers.append((k, v))
    mask = torch.zeros((len(rows), P), dtype=torch.long, device=cache_layers[0][0].device)
    for m, n in enumerate(lengths):
        mask[m, P - n:] = 1
    return layers, mask


@torch.inference_mode()
def greedy_continue(lm: LM, cache, mask: torch.Tensor, first: torch.Tensor, positions: torch.Tensor,
                    max_steps: int, done: Callable[[int, list[int]], bool],
                    on_step: Callable[[], None] | None = None,
                    first_mask: torch.Tensor | None = None) -> list[list[int]]:
    """Greedy decoding for a batch whose KV is in `cache` (mask [B, P] marks its real entries; P may be 0).
    `first` [B, N] are the next inputs with position ids `positions` [B, N] and mask `first_mask` (default all
    real; left padding for a prompt batch). Returns up to `max_steps` generated tokens per row; a row stops
    growing when `done(row, tokens)` is true; the loop ends when every row is done. Same layout as the
    worker's ragged extend: left-padded past, explicit 2D mask and position ids."""
    B = first.shape[0]
    out: list[list[int]] = [[] for _ in range(B)]
    finished = [False] * B
    ids, pos = first, positions
    mask = torch.cat([mask, first_mask if first_mask is not None else torch.ones_like(first)], dim=1)
    for _ in range(max_steps):
        h = lm.base(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True).last_hidden_state
        nxt = lm.lm_head(h[:, -1]).argmax(-1)
        for b in range(B):
            if not finished[b]:
                out[b].append(int(nxt[b]))
                finished[b] = done(b, out[b])
        if on_step:
            on_step()
        if all(finished):
            break
        ids = nxt[:, None]
        pos = pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=mask.device)], dim=1)
    return out


# ---- files -------------------------------------------------------------------------------------
def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def read_parts(folder: Path, pattern: str = "part-*.jsonl") -> list[dict]:
    out = []
    for p in sorted(Path(folder).glob(pattern)):
        out.extend(read_jsonl(p))
    return out


def next_part(folder: Path, prefix: str = "part", suffix: str = ".jsonl") -> Path:
    n = len(list(Path(folder).glob(f"{prefix}-*{suffix}")))
    while (Path(folder) / f"{prefix}-{n:05d}{suffix}").exists():
        n += 1
    return Path(folder) / f"{prefix}-{n:05d}{suffix}"


class StageLog:
    """A stage's summary.json: counts and seconds, accumulated over resumed runs."""

    def __init__(self, folder: Path, stage: str):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "summary.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"stage": stage, "seconds": 0.0}
        self.started = time.perf_counter()

    def add_seconds(self) -> None:
        now = time.perf_counter()
        self.data["seconds"] = round(self.data.get("seconds", 0.0) + now - self.started, 3)
        self.started = now

    def save(self, **fields) -> dict:
        self.add_seconds()
        self.data.update(fields)
        atomic_write_text(self.path, json.dumps(self.data, indent=2, sort_keys=True))
        return self.data


def check_config(folder: Path, config: dict) -> None:
    """A stage folder remembers the settings its outputs were made with; resuming with other settings
    would silently mix them, so it is refused."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
        if diff:
            shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
            raise ValueError(f"{folder} was made with other settings ({shown}); use a new --out folder or "
                             f"delete {folder} to redo this stage")
    else:
        atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True))


# ---- progress ----------------------------------------------------------------------------------
class Progress:
    """rich progress bar on a terminal; on a pipe/log file a plain line every `every_s` seconds."""

    def __init__(self, description: str, total: int, unit: str = "", quiet: bool = False, every_s: float = 20.0):
        self.description, self.total, self.unit, self.quiet = description, total, unit, quiet
        self.done = 0
        self.started = self.last = time.perf_counter()
        self.every_s = every_s
        self._rich = None
        if not quiet and sys.stderr.isatty():
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._rich = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TimeRemainingColumn(), transient=False)

    def __enter__(self):
        if self._rich:
            self._rich.start()
            self._task = self._rich.add_task(self.description, total=self.total)
        elif not self.quiet:
            print(f"[{self.description}] {self.total} {self.unit} to do", file=sys.stderr, flush=True)
        return self

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._rich:
            self._rich.update(self._task, advance=n)
            return
        now = time.perf_counter()
        if not self.quiet and now - self.last >= self.every_s:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            print(f"[{self.description}] {self.done}/{self.total} {self.unit} · {now - self.started:.0f}s elapsed · "
                  f"eta {eta:.0f}s", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._rich:
            self._rich.stop()
        elif not self.quiet:
            print(f"[{self.description}] {self.done}/{self.total} {self.unit} in "
                  f"{time.perf_counter() - self.started:.1f}s", file=sys.stderr, flush=True)
        return False


def say(text: str, quiet: bool = False) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)
