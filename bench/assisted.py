"""Hugging Face assisted generation: the lossless speculative-decoding baseline for R2R.

    python bench/assisted.py --slm DIR --llm DIR --prompt "Write a Python function ..." --max-tokens 64

The SLM drafts tokens and the LLM verifies them (`generate(..., assistant_model=slm)`); with greedy
decoding the output is the LLM's own greedy output, only faster when drafts are accepted. R2R instead
keeps most SLM tokens and lets the LLM write only the routed ones, so its output differs from the LLM's.
"Lossless" holds up to rounding: the LLM verifies several drafts in one forward, which rounds unlike
one-token steps. On the tiny pair float32 stayed token-identical (CPU and H100), but in bfloat16 on an
H100 assisted output left the LLM-only output on 10 of 12 prompts, so compare outputs in float32.

Measured like the coordinator measures a request (services/coordinator/servicer.py), so the numbers sit
next to the services' GenerationStats:
- the clock starts before the chat template is rendered;
- TTFT is when generate() hands over its first generated token (prefill included; in assisted mode
  also the SLM's first drafts and the LLM's first verification), 0 when nothing was generated;
- completion tokens exclude the final EOS; tokens_per_s = completion_tokens / total_s;
- stop strings end the answer like the coordinator's: the token that completes a stop string is the last
  one counted, and the text ends before the stop string.
Greedy is plain argmax: each model's generation_config is replaced by one that only names EOS and pad,
so a hub default like repetition_penalty cannot change the output (the service applies none either).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from r2r_serve.common.dtypes import parse_dtype_policy
from r2r_serve.common.tensors import parse_dtype
from r2r_serve.worker.engine import quantize_model
from r2r_serve.worker.prepack import prepack_available, prepack_linears

Mode = Literal["assisted", "llm", "slm"]
MODES: tuple[Mode, ...] = ("assisted", "llm", "slm")


@dataclass
class Pair:
    slm: torch.nn.Module
    llm: torch.nn.Module
    tokenizer: object         # the LLM folder's tokenizer (the SLM must share it)
    device: torch.device
    eos_token_ids: list[int]
    # The assistant's output heads by name: "full", and "draft" when loaded with slm_draft_vocab (the default
    # then, as the SLM worker drafts on it); generate(assistant_head=...) picks one.
    assistant_heads: dict[str, torch.nn.Module]


@dataclass
class Result:
    text: str
    token_ids: list[int]      # completion tokens, final EOS excluded
    completion_tokens: int
    ttft_s: float
    total_s: float
    tokens_per_s: float


class FirstTokenClock(BaseStreamer):
    """Records when generate() hands over its first generated token. generate() first puts the prompt,
    then new tokens as they are decided (each put copies them to the CPU, so a GPU has finished them)."""

    def __init__(self) -> None:
        self.prompt_seen = False
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
        elif self.first_token_at is None and value.numel() > 0:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


class StopStrings(StoppingCriteria):
    """Stops once the answer's text contains a stop string anywhere in the tokens added since the last
    call. HF's own `stop_strings` only look at the end of the sequence, and assisted decoding checks
    criteria once per verified chunk of several tokens, so a stop string inside a chunk would be missed."""

    def __init__(self, tokenizer, prompt_len: int, stops: Sequence[str]):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.scanned = prompt_len
        self.prompt_len = prompt_len
        # Tokens before the new ones to re-read: a stop string of c characters spans at most 4c byte-level tokens.
        self.overlap = 4 * max((len(s) for s in self.stops), default=0)

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        start = max(self.prompt_len, self.scanned - self.overlap)
        self.scanned = input_ids.shape[1]
        hit = bool(self.stops) and _first_stop(_decode(self.tokenizer, input_ids[0, start:].tolist()),
                                               self.stops) is not None
        return torch.full((input_ids.shape[0],), hit, dtype=torch.bool, device=input_ids.device)


# ---- loading --------------------------------------------------------------------------------------
def load_pair(slm_path: str | Path, llm_path: str | Path, device: str = "cpu", slm_dtype: str = "float32",
              llm_dtype: str = "float32", threads: int = 0, slm_quantize: str = "none",
              llm_quantize: str = "none", slm_draft_vocab: int = 0) -> Pair:
    """Both models from local folders (never the hub), in eval mode, plus the LLM folder's tokenizer.

    HF generate runs each model in one dtype: for a split policy (DECODE/PREFILL, common/dtypes.py) the
    drafting SLM takes DECODE (it writes token by token), the verifying LLM PREFILL (multi-token forwards).
    `*_quantize`: the workers' --quantize, applied as a worker applies it (to its DECODE weights), so this
    baseline runs the same weights as the services; float32 layers on the CPU are prepacked, as theirs are.
    `slm_draft_vocab`: the SLM worker's --draft-vocab, offered to the assistant alike (worker/draft_vocab.py):
    it drafts with that head unless generate() is asked for the full one."""
    from transformers import AutoTokenizer

    os.environ["HF_HUB_OFFLINE"] = "1"
    if threads > 0:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    tokenizer = AutoTokenizer.from_pretrained(_local(llm_path), local_files_only=True)
    slm = _load_model(slm_path, slm_dtype if slm_dtype == "auto" else parse_dtype_policy(slm_dtype).decode, dev)
    llm = _load_model(llm_path, llm_dtype if llm_dtype == "auto" else parse_dtype_policy(llm_dtype).prefill, dev)
    eos = _eos_ids(tokenizer, slm, llm)
    draft = None
    if slm_draft_vocab > 0:
        from r2r_serve.worker.draft_vocab import DraftHead, draft_token_ids

        head = slm.get_output_embeddings()
        draft = DraftHead(head, draft_token_ids(tokenizer, slm_draft_vocab, head.out_features, always=eos))
    for model, spec, quantize in ((slm, slm_dtype, slm_quantize), (llm, llm_dtype, llm_quantize), (draft, slm_dtype, slm_quantize)):
        if model is None:
            continue
        if quantize != "none" and (spec == "auto" or _dtype_of(model) == parse_dtype(parse_dtype_policy(spec).decode)):
            quantize_model(model, quantize)
        elif dev.type == "cpu" and prepack_available():
            prepack_linears(model)  # fp32 layers on prepacked weights, as the workers hold them
    heads = {"full": slm.get_output_embeddings()}
    if draft is not None:
        heads["draft"] = draft
        slm.set_output_embeddings(draft)
    for model in (slm, llm):
        _plain_greedy_config(model, eos, tokenizer)
    return Pair(slm=slm, llm=llm, tokenizer=tokenizer, device=dev, eos_token_ids=eos, assistant_heads=heads)


def _dtype_of(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _local(path: str | Path) -> str:
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path!r} is not a local model folder (the hub is not used here)")
    return str(path)


def _load_model(path: str | Path, dtype: str, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch_dtype = "auto" if dtype == "auto" else parse_dtype(dtype)  # auto: the folder's own dtype
    model = AutoModelForCausalLM.from_pretrained(_local(path), dtype=torch_dtype, local_files_only=True)
    return model.to(device).eval()


def _eos_ids(tokenizer, *models) -> list[int]:
    """Every id either model's generation config or the tokenizer calls EOS (as the workers do)."""
    ids: set[int] = set()
    values = [getattr(m.generation_config, "eos_token_id", None) for m in models] + [tokenizer.eos_token_id]
    for value in values:
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    return sorted(int(i) for i in ids)


def _plain_greedy_config(model, eos: list[int], tokenizer) -> None:
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad)


# ---- generation -----------------------------------------------------------------------------------
def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The chat prompt exactly as the coordinator builds it (services/coordinator/requests.py)."""
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def generate(pair: Pair, messages: list[dict], max_tokens: int, mode: Mode, stop: Sequence[str] = (),
             assistant_head: str | None = None) -> Result:
    """One greedy answer: "assisted" = the LLM with the SLM drafting, "llm"/"slm" = that model alone.
    `stop`: strings that end the answer (as the service's `stop`). `assistant_head`: one of
    pair.assistant_heads to draft with; None = "draft" when there is one, else "full"."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    stop = [stop] if isinstance(stop, str) else list(stop)
    started = time.perf_counter()
    ids = torch.tensor([prompt_ids(pair.tokenizer, messages)], device=pair.device)
    heads = pair.assistant_heads
    pair.slm.set_output_embeddings(heads[assistant_head or ("draft" if "draft" in heads else "full")])
    model = pair.slm if mode == "slm" else pair.llm
    extra = {"assistant_model": _checked_assistant(pair)} if mode == "assisted" else {}
    clock = FirstTokenClock()
    stops = StoppingCriteriaList([StopStrings(pair.tokenizer, ids.shape[1], stop)]) if any(stop) else None
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_tokens,
                         streamer=clock, stopping_criteria=stops, **extra)
    new = out[0, ids.shape[1]:].tolist()  # .tolist() waits for the device
    total = time.perf_counter() - started
    completion, text = _answer(pair.tokenizer, _until_eos(new, pair.eos_token_ids), stop)
    ttft = clock.first_token_at - started if completion and clock.first_token_at else 0.0
    return Result(text=text, token_ids=completion, completion_tokens=len(completion), ttft_s=ttft, total_s=total,
                  tokens_per_s=len(completion) / total if total > 0 else 0.0)


def run_requests(pair: Pair, requests, max_tokens: int, stop: Sequence[str] = (), progress=None,
                 label: str = "assisted generation", assistant_head: str | None = None):
    """`requests` (bench.runner.Request) one after another in assisted mode, as a bench.runner.RunResult so
    assisted runs sit beside the services' runs in the harness and in bench.ab (HF assists one sequence)."""
    from bench.runner import Outcome, RunResult

    task = progress.add_task(label, total=len(requests)) if progress is not None else None
    outcomes = []
    start = time.perf_counter()
    for req in requests:
        r = generate(pair, req.messages, max_tokens, "assisted", stop=stop, assistant_head=assistant_head)
        outcomes.append(Outcome(key=req.key, text=r.text, sources=["llm"] * r.completion_tokens, probabilities=[],
                                prompt_tokens=0, completion_tokens=r.completion_tokens, llm_share=1.0,
                                ttft_s=r.ttft_s, total_s=r.total_s, tokens_per_s=r.tokens_per_s, finish=""))
        if task is not None:
            progress.advance(task)
    return RunResult(outcomes, time.perf_counter() - start, 1)


def _checked_assistant(pair: Pair) -> torch.nn.Module:
    # Different vocab sizes send HF to its "different tokenizers" path (re-tokenizing text): not this baseline.
    sizes = (pair.slm.config.get_text_config().vocab_size, pair.llm.config.get_text_config().vocab_size)
    if sizes[0] != sizes[1]:
        raise ValueError(f"assisted generation needs one vocabulary; the SLM has {sizes[0]} entries, "
                         f"the LLM {sizes[1]}")
    return pair.slm


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in text, or None."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def _answer(tokenizer, tokens: list[int], stops: Sequence[str]) -> tuple[list[int], str]:
    """The answer's tokens and text, cut as the coordinator cuts them: tokens up to the one that completes
    the first stop string (generation may have run past it within a verified chunk), text before it."""
    text = _decode(tokenizer, tokens)
    cut = _first_stop(text, stops)
    if cut is None:
        return tokens, text
    lo, hi = 1, len(tokens)  # the shortest prefix whose text holds a stop string (containment only grows)
    while lo < hi:
        mid = (lo + hi) // 2
        if _first_stop(_decode(tokenizer, tokens[:mid]), stops) is None:
            lo = mid + 1
        else:
            hi = mid
    return tokens[:lo], text[:cut]


def _until_eos(tokens: list[int], eos: list[int]) -> list[int]:
    stop = set(eos)
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[:i]
    return tokens


# ---- command line ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    p = argparse.ArgumentParser(description="HF assisted generation vs the LLM alone vs the SLM alone (greedy)")
    p.add_argument("--slm", required=True, help="SLM folder")
    p.add_argument("--llm", required=True, help="LLM folder (its tokenizer is used)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--slm-dtype", default="float32")
    p.add_argument("--llm-dtype", default="float32")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--no-warmup", action="store_true", help="skip the short untimed run of each mode")
    args = p.parse_args(argv)

    console = Console()
    with console.status("loading models ..."):
        pair = load_pair(args.slm, args.llm, args.device, args.slm_dtype, args.llm_dtype, args.threads)
    messages = [{"role": "user", "content": args.prompt}]
    if not args.no_warmup:  # first-call allocations would otherwise land on whichever mode runs first
        with console.status("warming up ..."):
            for mode in MODES:
                generate(pair, messages, min(8, args.max_tokens), mode, args.stop)
    results = {mode: generate(pair, messages, args.max_tokens, mode, args.stop) for mode in MODES}

    llm = results["llm"]
    table = Table(title=f"greedy, max {args.max_tokens} tokens, {args.device}")
    for column in ("mode", "tokens", "TTFT s", "total s", "tok/s", "speed vs LLM", "output = LLM's"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for mode, r in results.items():
        speed = r.tokens_per_s / llm.tokens_per_s if llm.tokens_per_s else float("nan")
        table.add_row(mode, str(r.completion_tokens), f"{r.ttft_s:.3f}", f"{r.total_s:.3f}", f"{r.tokens_per_s:.1f}",
                      f"{speed:.2f}x", "yes" if r.token_ids == llm.token_ids else "no")
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
