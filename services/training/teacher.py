"""Stage 2: the SLM runs teacher-forced over prompt + LLM answer — one forward per batch of sequences —
and at every answer position stores its greedy prediction and the router features, computed exactly as
the serving SLM worker computes them: the final-norm hidden state at the position before the token,
`FeatureBatch.from_logits` over the full next-token logits (entropy in nats, top-1 probability, top-k
logits sorted descending), and the input embedding of the SLM's chosen (greedy) token.

Output: `2-teacher/shard-*.safetensors`, columns (N rows, one per answer position):
  hidden [N,H] f32, topk_logits [N,K] f32, token_embedding [N,H] f32, token_ids [N] i64 (SLM's token),
  llm_token_ids [N] i64, entropy [N] f64, top1_prob [N] f64, mismatch [N] u8, seq_id [N] i64 (index of the
  sequence in the prompt set), position [N] i64 (index in the answer); header metadata: ids (prompt ids of
  the shard's sequences), vocab_size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from r2r_serve.router.features import FeatureBatch
from r2r_serve.training.common import (LM, Progress, StageLog, check_config, next_part, read_parts,
                                       right_padded, say)
from r2r_serve.training.generate import STAGE_DIR as GENERATE_DIR

STAGE_DIR = "2-teacher"
COLUMNS = ("hidden", "topk_logits", "token_embedding", "token_ids", "llm_token_ids", "entropy", "top1_prob",
           "mismatch", "seq_id", "position")


def load_sequences(run_dir: Path) -> list[dict]:
    """Stage 1's answers in prompt-set order, each with its `seq` index."""
    records = read_parts(Path(run_dir) / GENERATE_DIR)
    order = json.loads((Path(run_dir) / "prompts.json").read_text())
    index = {p["id"]: i for i, p in enumerate(order)}
    records = sorted((r for r in records if r["id"] in index), key=lambda r: index[r["id"]])
    for r in records:
        r["seq"] = index[r["id"]]
    return records


def shard_ids(folder: Path) -> set[str]:
    done = set()
    for p in sorted(Path(folder).glob("shard-*.safetensors")):
        with safe_open(str(p), framework="pt") as f:
            done.update(json.loads(f.metadata()["ids"]))
    return done


def read_shards(folder: Path, columns=COLUMNS) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {c: [] for c in columns}
    for p in sorted(Path(folder).glob("shard-*.safetensors")):
        with safe_open(str(p), framework="pt") as f:
            for c in columns:
                parts[c].append(f.get_tensor(c))
    return {c: torch.cat(v) if v else torch.zeros(0) for c, v in parts.items()}


@torch.inference_mode()
def slm_features(slm: LM, sequences: list[dict], top_k: int) -> dict[str, torch.Tensor]:
    """Teacher-forced features for a batch of sequences (one forward, right-padded)."""
    full = [s["prompt_ids"] + s["answer_ids"] for s in sequences]
    ids, mask = right_padded(full, slm.pad_id(), slm.device)
    hidden_all = slm.base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    cols: dict[str, list[torch.Tensor]] = {c: [] for c in COLUMNS}
    for b, s in enumerate(sequences):
        P, A = len(s["prompt_ids"]), len(s["answer_ids"])
        if A == 0:
            continue
        hidden = hidden_all[b, P - 1: P - 1 + A]             # state before each answer token
        logits = slm.lm_head(hidden)                          # [A, V], as the worker's lm_head(hidden)
        chosen = logits.argmax(-1)
        feats = FeatureBatch.from_logits(logits, hidden, slm.embedding(chosen), chosen, top_k)
        llm_tokens = torch.tensor(s["answer_ids"], dtype=torch.long)
        cols["hidden"].append(feats.hidden.cpu())
        cols["topk_logits"].append(feats.topk_logits.cpu())
        cols["token_embedding"].append(feats.token_embedding.cpu())
        cols["token_ids"].append(feats.token_ids.cpu())
        cols["llm_token_ids"].append(llm_tokens)
        cols["entropy"].append(feats.entropy.cpu())
        cols["top1_prob"].append(feats.top1_prob.cpu())
        cols["mismatch"].append((feats.token_ids.cpu() != llm_tokens).to(torch.uint8))
        cols["seq_id"].append(torch.full((A,), s["seq"], dtype=torch.long))
        cols["position"].append(torch.arange(A, dtype=torch.long))
    return {c: torch.cat(v).contiguous() for c, v in cols.items()}


def run_teacher(slm: LM, run_dir: Path, top_k: int = 100, batch_size: int = 8, quiet: bool = False) -> dict:
    folder = Path(run_dir) / STAGE_DIR
    check_config(folder, {"slm": slm.name, "top_k": top_k})
    stage = StageLog(folder, "teacher")
    sequences = load_sequences(run_dir)
    done = shard_ids(folder)
    todo = [s for s in sequences if s["id"] not in done]
    if not todo:
        say(f"stage 2 (teacher): all {len(done)} sequences already there, skipped", quiet)
        return stage.save(skipped=len(done), new=0)
    todo.sort(key=lambda s: len(s["prompt_ids"]) + len(s["answer_ids"]))
    with Progress("stage 2 · SLM teacher forcing", sum(len(s["answer_ids"]) for s in todo), "positions", quiet) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start: start + batch_size]
            cols = slm_features(slm, batch, top_k)
            meta = {"ids": json.dumps([s["id"] for s in batch]), "vocab_size": str(slm.vocab_size)}
            path = next_part(folder, "shard", ".safetensors")
            tmp = path.with_suffix(".tmp")
            save_file(cols, str(tmp), metadata=meta)
            tmp.replace(path)
            bar.advance(sum(len(s["answer_ids"]) for s in batch))
            stage.save()
    allcols = read_shards(folder, ("mismatch",))
    n, mism = int(allcols["mismatch"].numel()), int(allcols["mismatch"].sum())
    summary = stage.save(skipped=len(done), new=len(todo), positions=n, mismatches=mism,
                         agreement=round(1 - mism / max(n, 1), 4), vocab_size=slm.vocab_size,
                         hidden_size=int(slm.embedding.embedding_dim), top_k=top_k)
    say(f"stage 2 (teacher): {len(todo)} new sequences; {n} positions, {mism} mismatches "
        f"(SLM/LLM top-1 agreement {summary['agreement']:.1%}), {summary['seconds']:.0f}s", quiet)
    return summary
