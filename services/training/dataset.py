"""Stage 5: the labeled dataset — stage 2's features joined with labels (identical token: 0; mismatch:
the verifier's verdict) — as safetensors shards plus `stats.json`.

`dataset/shard-*.safetensors` columns (N rows, one per answer position of the LLM's answers):

| column | shape, dtype | meaning |
|---|---|---|
| hidden | [N,H] f32 | SLM final-norm hidden state before the token (the worker's `hidden_state`) |
| topk_logits | [N,K] f32 | SLM's top-K next-token logits, sorted descending (K = 100 by default, as the worker) |
| token_embedding | [N,H] f32 | SLM input-embedding row of the SLM's chosen token (the worker's `token_embedding`) |
| token_ids | [N] i64 | SLM's greedy token |
| llm_token_ids | [N] i64 | LLM's greedy token (the answer's token) |
| entropy | [N] f64 | SLM next-token entropy, nats |
| top1_prob | [N] f64 | SLM top-1 probability |
| mismatch | [N] u8 | 1 where the SLM's token differs from the LLM's |
| labels | [N] u8 | 1 = divergent, 0 = neutral or identical |
| p_divergent | [N] f32 | judge's P(divergent) at mismatches it judged; -1 elsewhere |
| seq_id | [N] i64 | index of the sequence (prompt) in the run's prompt set |
| position | [N] i64 | index of the token in the LLM's answer |

Header metadata: `vocab_size`. `stats.json`: sizes, identical/neutral/divergent shares, verifier counts,
seconds per stage and the cost per labeled token.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from r2r_serve.router.features import FeatureBatch
from r2r_serve.training.common import Progress, StageLog, atomic_write_text, read_parts, say
from r2r_serve.training.teacher import STAGE_DIR as TEACHER_DIR
from r2r_serve.training.verify import STAGE_DIR as VERIFY_DIR

STAGE_DIR = "dataset"
COLUMNS = ("hidden", "topk_logits", "token_embedding", "token_ids", "llm_token_ids", "entropy", "top1_prob",
           "mismatch", "labels", "p_divergent", "seq_id", "position")
STAGE_DIRS = ("1-generate", "2-teacher", "3-continue", "4-verify")


def run_dataset(run_dir: Path, quiet: bool = False, extra_stats: dict | None = None,
                judge_threshold: float | None = None) -> dict:
    """`judge_threshold`: P(divergent) from which a judged mismatch is divergent (default: the threshold
    stage 4 measured on identical control pairs, or 0.5)."""
    from r2r_serve.training.verify import judge_threshold as measured_threshold

    run_dir = Path(run_dir)
    folder = run_dir / STAGE_DIR
    stage = StageLog(folder, "dataset")
    threshold = measured_threshold(run_dir, judge_threshold)
    verdicts = {r["key"]: r for r in read_parts(run_dir / VERIFY_DIR)}
    for v in verdicts.values():
        if v.get("p_divergent") is not None:
            v["label"] = int(v["p_divergent"] >= threshold)
    judged = [v for v in verdicts.values() if v.get("p_divergent") is not None]
    shards = sorted((run_dir / TEACHER_DIR).glob("shard-*.safetensors"))
    counts = dict(positions=0, mismatches=0, divergent=0, unverified=0)
    vocab = hidden_size = top_k = None
    with Progress("stage 5 · dataset", len(shards), "shards", quiet) as bar:
        for src in shards:
            with safe_open(str(src), framework="pt") as f:
                cols = {k: f.get_tensor(k) for k in f.keys()}
                meta = f.metadata()
            vocab = int(meta["vocab_size"])
            hidden_size, top_k = cols["hidden"].shape[1], cols["topk_logits"].shape[1]
            n = cols["mismatch"].shape[0]
            labels = torch.zeros(n, dtype=torch.uint8)
            p_div = torch.full((n,), -1.0)
            keep = torch.ones(n, dtype=torch.bool)
            for i in cols["mismatch"].nonzero().flatten().tolist():
                v = verdicts.get(f"{int(cols['seq_id'][i])}:{int(cols['position'][i])}")
                if v is None:  # not verified yet (an interrupted stage 4): leave the row out
                    keep[i] = False
                    counts["unverified"] += 1
                    continue
                labels[i] = int(v["label"])
                if v.get("p_divergent") is not None:
                    p_div[i] = float(v["p_divergent"])
            cols.update(labels=labels, p_divergent=p_div)
            cols = {k: cols[k][keep].contiguous() for k in COLUMNS}
            counts["positions"] += int(keep.sum())
            counts["mismatches"] += int(cols["mismatch"].sum())
            counts["divergent"] += int(cols["labels"].sum())
            dst = folder / src.name
            tmp = dst.with_suffix(".tmp")
            save_file(cols, str(tmp), metadata={"vocab_size": str(vocab)})
            tmp.replace(dst)
            bar.advance()
    n = max(counts["positions"], 1)
    seconds = {}
    for d in STAGE_DIRS:
        p = run_dir / d / "summary.json"
        if p.exists():
            seconds[d] = json.loads(p.read_text()).get("seconds", 0.0)
    verify = json.loads((run_dir / VERIFY_DIR / "summary.json").read_text()) if (run_dir / VERIFY_DIR / "summary.json").exists() else {}
    stats = {
        **counts,
        "sequences": len({s for s in _seq_ids(folder)}),
        "identical": counts["positions"] - counts["mismatches"],
        "neutral": counts["mismatches"] - counts["divergent"],
        "identical_share": round((counts["positions"] - counts["mismatches"]) / n, 5),
        "neutral_share": round((counts["mismatches"] - counts["divergent"]) / n, 5),
        "divergent_share": round(counts["divergent"] / n, 5),
        "hidden_size": hidden_size, "top_k": top_k, "vocab_size": vocab,
        "verifier": {**{k: verify.get(k) for k in ("judged", "proxy_only", "proxy_divergent_share")},
                     "judge_threshold": threshold,
                     "judge_divergent_share": round(sum(v["label"] for v in judged) / max(len(judged), 1), 4),
                     "proxy_judge_agreement": (round(sum(v["label"] == v["proxy_label"] for v in judged) / len(judged), 4)
                                               if judged else None)},
        "stage_seconds": seconds,
        "labeling_seconds": round(sum(seconds.values()), 1),
        "seconds_per_labeled_token": round(sum(seconds.values()) / n, 4),
        **(extra_stats or {}),
    }
    atomic_write_text(folder / "stats.json", json.dumps(stats, indent=2, sort_keys=True))
    stage.save(**{k: stats[k] for k in ("positions", "mismatches", "divergent")})
    say(f"stage 5 (dataset): {stats['positions']} positions from {stats['sequences']} sequences — identical "
        f"{stats['identical_share']:.1%}, neutral {stats['neutral_share']:.1%}, divergent {stats['divergent_share']:.1%}; "
        f"labeling cost {stats['seconds_per_labeled_token']:.3f} s per labeled token", quiet)
    return stats


def _seq_ids(folder: Path):
    for p in sorted(Path(folder).glob("shard-*.safetensors")):
        with safe_open(str(p), framework="pt") as f:
            yield from f.get_tensor("seq_id").unique().tolist()


def load_dataset(path: str | Path) -> tuple[FeatureBatch, dict[str, torch.Tensor], dict]:
    """(features, columns, stats) of a dataset folder (or a run folder holding `dataset/`)."""
    p = Path(path)
    if (p / STAGE_DIR).is_dir() and not list(p.glob("shard-*.safetensors")):
        p = p / STAGE_DIR
    shards = sorted(p.glob("shard-*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no dataset shards (shard-*.safetensors) in {p}; run `r2r label` first")
    parts: dict[str, list[torch.Tensor]] = {c: [] for c in COLUMNS}
    vocab = 0
    for s in shards:
        with safe_open(str(s), framework="pt") as f:
            vocab = int(f.metadata()["vocab_size"])
            for c in COLUMNS:
                parts[c].append(f.get_tensor(c))
    cols = {c: torch.cat(v) for c, v in parts.items()}
    features = FeatureBatch(cols["hidden"], cols["topk_logits"], cols["token_embedding"], cols["token_ids"],
                            cols["entropy"], cols["top1_prob"], vocab)
    stats = json.loads((p / "stats.json").read_text()) if (p / "stats.json").exists() else {}
    return features, cols, stats
