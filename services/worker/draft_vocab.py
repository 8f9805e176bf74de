"""A drafting head: the SLM scores only the tokens it is likely to write (FR-Spec's frequency-ranked drafting).

The 0.5B SLM's output head multiplies the hidden state by 151,936 vocabulary rows: on a CPU that is about a
fifth of a decode step, spent mostly on tokens an answer never contains. With `--draft-vocab N` the SLM worker
keeps only the head rows of the N most frequent tokens (plus every special token): logits of the others are
-inf, so the SLM never proposes them, and its decode step reads a third or less of the head's bytes.
(Zhao et al. 2025, "FR-Spec: Accelerating Large-Vocabulary Language Models via Frequency-Ranked Speculative
Sampling"; SGLang's --speculative-token-map.)

What it changes: the SLM's choices are made among those N tokens. In verify mode with rollback_below 1
(lossless: the LLM judges every SLM token) answers stay the LLM's own; a token outside the set costs one
rejected draft. Elsewhere the SLM alone (threshold > 1) equals its greedy generate() with the other tokens
masked, not its plain generate(); router features (entropy, top-1 probability) come from the restricted
distribution. Off by default.

The ranking needs no download and no evaluation data: token frequencies over the Python standard library's
source on this machine (the same files for a given Python version, so every replica picks the same set) or
over `--draft-vocab-corpus` (text of the domain served: a codebase, past answers), after a few tokens of the
chat answers' markdown, then the remaining ids in the tokenizer's own order (BPE merge order, roughly its
training corpus's frequency order: common English words come early).
"""

from __future__ import annotations

import collections
import sysconfig
from pathlib import Path

import torch

# Chat answers wrap code in markdown fences, and code ends lines in whitespace-only tokens the standard
# library's (clean) source rarely contains.
CHAT_SEED = ("```", "```python\n", "```\n", "```\n\n", " \n", "    \n", "\n    \n", "\n\n")


def stdlib_sources() -> list[Path]:
    """The standard library's .py files, sorted (tests and installed packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def corpus_files(path: str | Path | None) -> list[Path]:
    """--draft-vocab-corpus: a text file, or every file under a folder (sorted); None = the standard library."""
    if path is None:
        return stdlib_sources()
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"draft vocabulary corpus {str(path)!r} is neither a file nor a folder")
    return sorted(p for p in path.rglob("*") if p.is_file())


def rank_tokens(tokenizer, sources: list[Path] | None = None) -> list[int]:
    """Every token id, most likely to be written first: the chat seed, then by frequency over `sources`
    (default: the standard library), then the rest in id order. Deterministic for given files."""
    counts: collections.Counter[int] = collections.Counter()
    texts = []
    for path in stdlib_sources() if sources is None else sources:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    for i in range(0, len(texts), 64):  # batches: the fast tokenizer's threads, bounded memory
        for ids in tokenizer(texts[i:i + 64], add_special_tokens=False, verbose=False)["input_ids"]:
            counts.update(ids)
    seed = [i for text in CHAT_SEED for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    by_frequency = sorted(counts, key=lambda i: (-counts[i], i))
    ranked = list(dict.fromkeys([*seed, *by_frequency]))
    seen = set(ranked)
    return ranked + [i for i in range(len(tokenizer)) if i not in seen]


def draft_token_ids(tokenizer, size: int, vocab_size: int, always: list[int] = (),
                    sources: list[Path] | None = None) -> torch.Tensor:
    """The sorted ids the drafting head keeps: the `size` best-ranked tokens, every special and added token
    and `always` (the model's EOS ids), all below the model's `vocab_size` (its head may have padding rows)."""
    keep = set(rank_tokens(tokenizer, sources)[:size])
    keep.update(tokenizer.all_special_ids, tokenizer.added_tokens_decoder, always)
    return torch.tensor(sorted(i for i in keep if 0 <= i < vocab_size), dtype=torch.long)


class DraftHead(torch.nn.Module):
    """The output head over a subset of the vocabulary: full-width logits, -inf outside `ids`, so everything
    downstream (sampling, logprobs, router features) reads them as it reads the full head's."""

    def __init__(self, head: torch.nn.Linear, ids: torch.Tensor):
        super().__init__()
        self.vocab_size = head.out_features
        self.register_buffer("ids", ids.to(head.weight.device), persistent=False)
        self.proj = torch.nn.Linear(head.in_features, len(ids), bias=head.bias is not None,
                                    device=head.weight.device, dtype=head.weight.dtype)
        with torch.no_grad():  # a copy: a tied head's weight is the embedding's and must stay whole
            self.proj.weight.copy_(head.weight[ids])
            if head.bias is not None:
                self.proj.bias.copy_(head.bias[ids])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        kept = self.proj(hidden)
        logits = kept.new_full((*kept.shape[:-1], self.vocab_size), float("-inf"))
        return logits.index_copy_(-1, self.ids, kept)

    def extra_repr(self) -> str:
        return f"kept={len(self.ids)} of {self.vocab_size}"


def install_draft_head(model, ids: torch.Tensor) -> DraftHead:
    """Replace `model`'s output head (in place) by a DraftHead over `ids`."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"the output head is a {type(head).__name__}, not a plain Linear: install the "
                        "drafting head before quantizing or prepacking")
    draft = DraftHead(head, ids)
    model.set_output_embeddings(draft)
    return draft
