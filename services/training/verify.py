"""Stage 4: a verifier decides, for every mismatch, whether the SLM's continuation and the LLM's differ in
meaning (divergent, label 1) or not (neutral, label 0). Pluggable (`VERIFIERS`):

- `judge` (default): the LLM itself, prompted as a judge with the answer so far and the two versions (in
  an order fixed per item by a hash, so a position bias cannot favour one side). It does not generate:
  one forward per batch reads the next-token probabilities of "Yes" and "No" after the question "Do A and
  B mean the same?", and P(divergent) = P(No) / (P(Yes) + P(No)). The instruction part of the prompt is
  the same for every item: its KV is computed once and shared by every batch.
- `proxy`: free. Neutral when the two continuations are equal after removing all whitespace or share at
  least half of their words (Jaccard over lower-cased words) — divergent otherwise. A crude rule:
  see the router README for its measured agreement with the judge.

The judge's own "Yes"/"No" lean is measured on identical pairs (`judge-controls.json`, see `judge_controls`)
and sets the label threshold on P(divergent) that stage 5 applies (0.5 for an unbiased judge).

Output: `4-verify/part-*.jsonl`, one record per mismatch: {key, label (at P >= 0.5), p_divergent, verifier, proxy_label}
(the proxy's verdict is recorded for every item, so its agreement with the judge is measured on all of them).
`--judge-limit N` judges only the first N mismatches (in a fixed random order) and labels the rest with the
proxy, for runs where the judge would take too long.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from transformers import DynamicCache

from r2r_serve.training.common import (LM, Progress, StageLog, atomic_write_text, check_config, next_part, read_parts,
                                       right_padded, say, write_jsonl)
from r2r_serve.training.continue_ import STAGE_DIR as CONTINUE_DIR

STAGE_DIR = "4-verify"
VERIFIERS = ("judge", "proxy")

JUDGE_SYSTEM = "You are a careful, strict reviewer of code and technical text."
JUDGE_INSTRUCTION = (
    "Two versions of the next line of a partial answer are shown. Decide whether they mean the same thing: "
    "for code, the same behaviour; for prose, the same meaning and intent. Differences only in formatting, "
    "wording, variable names or comments do not matter. Different logic, values, calls, structure or "
    "claims do.\n"
)
_MARK = "\u241f"  # separates the shared instruction from the per-item part while rendering the template


def _hash01(key: str) -> float:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def proxy_label(slm_text: str, llm_text: str, overlap: float = 0.5) -> int:
    """Neutral (0) when the continuations are equal up to whitespace, or share at least `overlap` of their
    words (Jaccard: "Python implementation name." vs "name of the Python implementation."); else 1."""
    a, b = _squash(slm_text), _squash(llm_text)
    if a == b:
        return 0
    wa, wb = _words(slm_text), _words(llm_text)
    if wa and wb and len(wa & wb) / len(wa | wb) >= overlap:
        return 0
    return 1


def _clip(text: str, n: int) -> str:
    text = text.replace("```", "'''")
    return text if len(text) <= n else "..." + text[-n:]


class JudgeVerifier:
    name = "judge"

    def __init__(self, llm: LM, batch_size: int = 16):
        self.llm, self.batch_size = llm, batch_size
        tok = llm.tokenizer
        yes, no = self._first_token(["Yes", " Yes"]), self._first_token(["No", " No"])
        self.yes, self.no = sorted(yes - no), sorted(no - yes)  # a token both start with says nothing
        if not self.yes or not self.no:
            raise ValueError("the judge's Yes and No answers start with the same token in this tokenizer")
        rendered = self._render(_MARK)
        head = rendered.split(_MARK)[0]
        self.prefix_ids = list(tok(head, add_special_tokens=False)["input_ids"])
        self._prefix_layers = None

    def _first_token(self, words: list[str]) -> set[int]:
        return {self.llm.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words}

    def _render(self, body: str) -> str:
        tok = self.llm.tokenizer
        user = JUDGE_INSTRUCTION + body
        messages = [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{JUDGE_SYSTEM}\n{user}\nAnswer: "

    def item_text(self, item: dict) -> str:
        context = item["context"].strip("\n") or f"(the answer starts here; the task was: {item['task']})"
        context = _clip(context, 200)
        a, b = item["slm_text"], item["llm_text"]
        if _hash01(item["key"]) < 0.5:
            a, b = b, a
        return (f"\nAnswer so far:\n```\n{context}\n```\nVersion A of the next line:\n```\n{_clip(a, 200)}\n```\n"
                f"Version B of the next line:\n```\n{_clip(b, 200)}\n```\nDo A and B mean the same? Answer Yes or No.")

    def tail_ids(self, item: dict) -> list[int]:
        tail = self._render(_MARK + self.item_text(item)).split(_MARK, 1)[1]
        return list(self.llm.tokenizer(tail, add_special_tokens=False)["input_ids"])

    @torch.inference_mode()
    def p_divergent(self, items: list[dict]) -> list[float]:
        llm = self.llm
        if self._prefix_layers is None:
            cache = DynamicCache()
            ids = torch.tensor([self.prefix_ids], dtype=torch.long, device=llm.device)
            llm.base(input_ids=ids, cache=cache, use_cache=True)
            self._prefix_layers = [(layer.keys, layer.values) for layer in cache.layers]
        tails = [self.tail_ids(it) for it in items]
        B, P = len(items), len(self.prefix_ids)
        ids, tail_mask = right_padded(tails, llm.pad_id(), llm.device)
        mask = torch.cat([torch.ones((B, P), dtype=torch.long, device=llm.device), tail_mask], dim=1)
        positions = (P + torch.arange(ids.shape[1], device=llm.device)).expand(B, -1)
        layers = [(k.expand(B, -1, -1, -1).contiguous(), v.expand(B, -1, -1, -1).contiguous())
                  for k, v in self._prefix_layers]
        h = llm.base(input_ids=ids, attention_mask=mask, position_ids=positions,
                     cache=DynamicCache(ddp_cache_data=layers), use_cache=True).last_hidden_state
        last = torch.tensor([len(t) - 1 for t in tails], device=llm.device)
        logp = torch.log_softmax(llm.lm_head(h[torch.arange(B, device=llm.device), last]).double(), -1)
        p_yes = logp[:, self.yes].exp().sum(-1)
        p_no = logp[:, self.no].exp().sum(-1)
        return (p_no / (p_yes + p_no).clamp(min=1e-300)).tolist()


CONTROLS_FILE = "judge-controls.json"


def judge_controls(judge: JudgeVerifier, items: list[dict], n: int = 64, quantile: float = 0.9) -> dict:
    """The judge's bias, measured: a fixed sample of `n` mismatches shown with *identical* versions (the
    LLM's continuation on both sides; the answer is "Yes" by construction). A small LLM as judge leans to
    "No"; the label threshold is the `quantile` of P(divergent) on these controls (at least 0.5), so at
    most ~10% of identical pairs would be called divergent."""
    sample = sorted(items, key=lambda it: _hash01("control:" + it["key"]))[:n]
    controls = [{**it, "slm_text": it["llm_text"]} for it in sample]
    probs = []
    for start in range(0, len(controls), judge.batch_size):
        probs += judge.p_divergent(controls[start: start + judge.batch_size])
    q = float(torch.tensor(probs, dtype=torch.float64).quantile(quantile)) if probs else 0.5
    return {"n": len(probs), "quantile": quantile, "p_divergent": [round(p, 6) for p in probs],
            "mean": sum(probs) / max(len(probs), 1), "threshold": max(0.5, q)}


def judge_threshold(run_dir: Path, override: float | None = None) -> float:
    """The P(divergent) at or above which a judged mismatch is labeled divergent."""
    if override is not None:
        return override
    p = Path(run_dir) / STAGE_DIR / CONTROLS_FILE
    return json.loads(p.read_text())["threshold"] if p.exists() else 0.5


def run_verify(llm: LM | None, run_dir: Path, verifier: str = "judge", batch_size: int = 16,
               judge_limit: int | None = None, quiet: bool = False, first_seqs: set[int] | None = None,
               controls: int = 64) -> dict:
    """`first_seqs`: sequences whose mismatches are judged before all others (with a judge limit, the
    validation sequences, so that the metrics and the calibration rest on judge labels only)."""
    if verifier not in VERIFIERS:
        raise ValueError(f"unknown verifier {verifier!r}; choose one of {', '.join(VERIFIERS)}")
    folder = Path(run_dir) / STAGE_DIR
    check_config(folder, {"verifier": verifier, "llm": llm.name if (llm and verifier == "judge") else None})
    stage = StageLog(folder, "verify")
    done = read_parts(folder)
    done_keys = {r["key"] for r in done}
    all_items = read_parts(Path(run_dir) / CONTINUE_DIR)
    items = [it for it in all_items if it["key"] not in done_keys]
    controls_path = folder / CONTROLS_FILE
    if verifier == "judge" and not controls_path.exists() and all_items and controls > 0:
        controls_result = judge_controls(JudgeVerifier(llm, batch_size), all_items, controls)
        atomic_write_text(controls_path, json.dumps(controls_result, indent=1))
        say(f"stage 4 (verify): judge bias on {controls_result['n']} identical pairs: mean P(divergent) "
            f"{controls_result['mean']:.3f}; label threshold {controls_result['threshold']:.3f}", quiet)
    if not items:
        say(f"stage 4 (verify): all {len(done_keys)} mismatches already judged, skipped", quiet)
        return stage.save(skipped=len(done_keys), new=0)
    # a fixed random order (a judge limit takes a random sample), `first_seqs` first
    first_seqs = first_seqs or set()
    items.sort(key=lambda it: (it["seq"] not in first_seqs, _hash01("order:" + it["key"])))
    judged_before = sum(r["verifier"] == "judge" for r in done)
    budget = None if judge_limit is None else max(judge_limit - judged_before, 0)
    to_judge = items if verifier == "judge" and budget is None else (items[:budget] if verifier == "judge" else [])
    judge = JudgeVerifier(llm, batch_size) if to_judge else None
    with Progress(f"stage 4 · verify ({verifier})", len(items), "mismatches", quiet) as bar:
        if judge:
            order = sorted(to_judge, key=lambda it: len(judge.tail_ids(it)))  # similar lengths per batch
            for start in range(0, len(order), batch_size):
                chunk = order[start: start + batch_size]
                probs = judge.p_divergent(chunk)
                write_jsonl(next_part(folder), [
                    {"key": it["key"], "label": int(p >= 0.5), "p_divergent": round(p, 6), "verifier": "judge",
                     "proxy_label": proxy_label(it["slm_text"], it["llm_text"])} for it, p in zip(chunk, probs)])
                bar.advance(len(chunk))
                stage.save()
        rest = items[len(to_judge):]
        if rest:
            write_jsonl(next_part(folder), [
                {"key": it["key"], "label": proxy_label(it["slm_text"], it["llm_text"]), "p_divergent": None,
                 "verifier": "proxy", "proxy_label": proxy_label(it["slm_text"], it["llm_text"])} for it in rest])
            bar.advance(len(rest))
    total = read_parts(folder)
    judged = [r for r in total if r["verifier"] == "judge"]
    agree = sum(r["label"] == r["proxy_label"] for r in judged)
    summary = stage.save(skipped=len(done_keys), new=len(items), verified=len(total), judged=len(judged),
                         proxy_only=len(total) - len(judged),
                         divergent=sum(r["label"] for r in total),
                         judge_divergent_share=round(sum(r["label"] for r in judged) / max(len(judged), 1), 4),
                         proxy_divergent_share=round(sum(r["proxy_label"] for r in total) / max(len(total), 1), 4),
                         proxy_judge_agreement=round(agree / len(judged), 4) if judged else None)
    say(f"stage 4 (verify): {len(items)} new verdicts ({summary['judged']} by the judge, {summary['proxy_only']} by the "
        f"proxy); divergent {summary['divergent']}/{len(total)}; proxy agrees with the judge on "
        f"{summary['proxy_judge_agreement']}, {summary['seconds']:.0f}s", quiet)
    return summary
