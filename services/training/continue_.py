"""Stage 3: at every position where the SLM's token differs from the LLM's, the LLM continues greedily from
prefix + SLM token to the end of the line or sentence (at most `max_tokens` tokens, the SLM's token
included). The other side is the LLM's own answer from that position, cut by the same rule: it is
exactly the LLM's greedy continuation from prefix + LLM token.

Batched: the LLM runs one forward over a group of sequences (right-padded, up to their last mismatch),
then every mismatch of the group continues from a left-padded crop of that KV cache — no per-mismatch
prefill. Output: `3-continue/part-*.jsonl`, one record per mismatch:
{key: "seq:pos", seq, pos, slm_token, llm_token, slm_cont, llm_cont (token ids), slm_text, llm_text,
 context (the answer so far, its last 400 characters), task (the prompt text)}.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import DynamicCache

from r2r_serve.training.common import (LM, Progress, StageLog, check_config, greedy_continue, kv_left_padded,
                                       next_part, read_parts, right_padded, say, write_jsonl)
from r2r_serve.training.teacher import STAGE_DIR as TEACHER_DIR, load_sequences, read_shards

STAGE_DIR = "3-continue"
_SENTENCE_END = re.compile(r"[.!?][\s]")


def unit_finished(text: str) -> bool:
    """True once `text` holds a complete line or sentence: after some non-blank content, a newline or
    sentence-final punctuation followed by whitespace."""
    m = re.search(r"\S", text)
    if not m:
        return False
    rest = text[m.start():]
    return "\n" in rest or bool(_SENTENCE_END.search(rest))


def cut_unit(tokenizer, tokens: list[int], max_tokens: int, eos: set[int]) -> list[int]:
    """The shortest prefix of `tokens` that finishes a line/sentence (or hits EOS / max_tokens)."""
    out = []
    for t in tokens[:max_tokens]:
        out.append(t)
        if t in eos or unit_finished(tokenizer.decode(out)):
            break
    return out


def mismatches(run_dir: Path) -> list[dict]:
    cols = read_shards(Path(run_dir) / TEACHER_DIR, ("mismatch", "seq_id", "position", "token_ids", "llm_token_ids"))
    rows = cols["mismatch"].nonzero().flatten().tolist()
    return [{"key": f"{int(cols['seq_id'][i])}:{int(cols['position'][i])}", "seq": int(cols["seq_id"][i]),
             "pos": int(cols["position"][i]), "slm_token": int(cols["token_ids"][i]),
             "llm_token": int(cols["llm_token_ids"][i])} for i in rows]


@torch.inference_mode()
def _continue_group(llm: LM, seqs: dict[int, dict], items: list[dict], max_tokens: int, batch_size: int,
                    bar) -> list[dict]:
    tok, eos = llm.tokenizer, llm.eos_ids()
    order = sorted({it["seq"] for it in items})
    row_of = {s: i for i, s in enumerate(order)}
    prefixes = []
    for s in order:
        seq = seqs[s]
        last = max(it["pos"] for it in items if it["seq"] == s)
        prefixes.append(seq["prompt_ids"] + seq["answer_ids"][:last])
    ids, mask = right_padded(prefixes, llm.pad_id(), llm.device)
    cache = DynamicCache()
    llm.base(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start: start + batch_size]
        lengths = [len(seqs[it["seq"]]["prompt_ids"]) + it["pos"] for it in chunk]
        kv, kv_mask = kv_left_padded(layers, [row_of[it["seq"]] for it in chunk], lengths)
        first = torch.tensor([[it["slm_token"]] for it in chunk], dtype=torch.long, device=llm.device)
        positions = torch.tensor([[n] for n in lengths], dtype=torch.long, device=llm.device)
        initially_done = [it["slm_token"] in eos or unit_finished(tok.decode([it["slm_token"]])) for it in chunk]

        def done(b, toks, chunk=chunk, initially_done=initially_done):
            if initially_done[b]:
                return True
            seq = [chunk[b]["slm_token"]] + toks
            return toks[-1] in eos or len(seq) >= max_tokens or unit_finished(tok.decode(seq))

        gen = [[] for _ in chunk]
        if max_tokens > 1 and not all(initially_done):
            gen = greedy_continue(llm, DynamicCache(ddp_cache_data=kv), kv_mask, first, positions, max_tokens - 1,
                                  done)
        for it, g, skip in zip(chunk, gen, initially_done):
            seq = seqs[it["seq"]]
            slm_cont = [it["slm_token"]] + ([] if skip else g)
            llm_cont = cut_unit(tok, seq["answer_ids"][it["pos"]:], max_tokens, eos)
            answer_so_far = tok.decode(seq["answer_ids"][: it["pos"]])
            out.append({**it, "slm_cont": slm_cont, "llm_cont": llm_cont, "slm_text": tok.decode(slm_cont),
                        "llm_text": tok.decode(llm_cont), "context": answer_so_far[-400:], "task": seq["prompt"]})
        bar.advance(len(chunk))
    return out


def run_continue(llm: LM, run_dir: Path, max_tokens: int = 24, batch_size: int = 32, quiet: bool = False) -> dict:
    folder = Path(run_dir) / STAGE_DIR
    check_config(folder, {"llm": llm.name, "max_tokens": max_tokens})
    stage = StageLog(folder, "continue")
    done = {r["key"] for r in read_parts(folder)}
    items = [it for it in mismatches(run_dir) if it["key"] not in done]
    if not items:
        say(f"stage 3 (continue): all {len(done)} mismatches already continued, skipped", quiet)
        return stage.save(skipped=len(done), new=0, mismatches=len(done))
    seqs = {s["seq"]: s for s in load_sequences(run_dir)}
    # Groups of whole sequences holding about one batch of mismatches: one prefix forward per group.
    groups, current = [], []
    for it in sorted(items, key=lambda it: (it["seq"], it["pos"])):
        if current and current[-1]["seq"] != it["seq"] and len(current) >= batch_size:
            groups.append(current)
            current = []
        current.append(it)
    if current:
        groups.append(current)
    with Progress("stage 3 · LLM continuations", len(items), "mismatches", quiet) as bar:
        for group in groups:
            records = _continue_group(llm, seqs, group, max_tokens, batch_size, bar)
            write_jsonl(next_part(folder), records)
            stage.save()
    total = read_parts(folder)
    summary = stage.save(skipped=len(done), new=len(items), mismatches=len(total),
                         mean_slm_cont_tokens=round(sum(len(r["slm_cont"]) for r in total) / max(len(total), 1), 2))
    say(f"stage 3 (continue): {len(items)} new continuations ({len(total)} in all), {summary['seconds']:.0f}s", quiet)
    return summary
