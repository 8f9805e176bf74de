"""Stage 1: the LLM answers every prompt greedily (batched, left-padded; one forward per decode step for
the whole batch). Output: `1-generate/part-*.jsonl`, one record per prompt:
{id, prompt, prompt_ids, answer_ids, finished} — `answer_ids` ends with the EOS token when the LLM stopped
by itself (that position is labeled too: the SLM must also know when to stop)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import DynamicCache

from r2r_serve.training.common import (LM, Progress, StageLog, check_config, greedy_continue, left_padded,
                                       next_part, read_parts, render_chat, say, write_jsonl)

STAGE_DIR = "1-generate"


@torch.inference_mode()
def run_generate(llm: LM, prompts: list[dict], run_dir: Path, max_new_tokens: int = 160, batch_size: int = 16,
                 quiet: bool = False) -> dict:
    folder = Path(run_dir) / STAGE_DIR
    check_config(folder, {"llm": llm.name, "max_new_tokens": max_new_tokens})
    stage = StageLog(folder, "generate")
    done = {r["id"] for r in read_parts(folder)}
    todo = [p for p in prompts if p["id"] not in done]
    if not todo:
        say(f"stage 1 (generate): all {len(done)} answers already there, skipped", quiet)
        return stage.save(skipped=len(done), new=0, sequences=len(done))
    rows = [(p, render_chat(llm.tokenizer, p["text"])) for p in todo]
    rows.sort(key=lambda r: len(r[1]))  # similar lengths share a batch: less padding
    eos, pad = llm.eos_ids(), llm.pad_id()
    new_tokens = 0
    with Progress("stage 1 · LLM answers", len(rows) * max_new_tokens, "decode steps x rows", quiet) as bar:
        for start in range(0, len(rows), batch_size):
            batch = rows[start: start + batch_size]
            ids, mask, pos = left_padded([r[1] for r in batch], pad, llm.device)
            B = len(batch)

            def stop(b, toks):
                return toks[-1] in eos or len(toks) >= max_new_tokens

            answers = greedy_continue(llm, DynamicCache(), mask[:, :0], ids, pos, max_new_tokens, stop,
                                      on_step=lambda: bar.advance(B), first_mask=mask)
            records = []
            for (p, prompt_ids), ans in zip(batch, answers):
                new_tokens += len(ans)
                records.append({"id": p["id"], "prompt": p["text"], "prompt_ids": prompt_ids, "answer_ids": ans,
                                "finished": bool(ans and ans[-1] in eos)})
            write_jsonl(next_part(folder), records)
            stage.save(answered=len(done) + start + B)
    total = read_parts(folder)
    summary = stage.save(skipped=len(done), new=len(todo), sequences=len(total),
                         answer_tokens=sum(len(r["answer_ids"]) for r in total),
                         finished_by_eos=sum(r["finished"] for r in total))
    say(f"stage 1 (generate): {len(todo)} new answers, {new_tokens} tokens; "
        f"{summary['sequences']} sequences in all, {summary['seconds']:.0f}s", quiet)
    return summary
