"""Router training: class-weighted BCE (positives weighted n_neg / n_pos on the training split), AdamW,
minibatches, early stopping on a validation split made by *sequence* (positions of one answer are strongly
correlated; splitting by position would leak), best epoch kept, progress display, and a loss/recall plot.
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from r2r_serve.router.features import FeatureBatch
from r2r_serve.router.mlp import RouterConfig, RouterMLP
from r2r_serve.training.calibrate import auc, rates, threshold_for_recall
from r2r_serve.training.common import Progress, say


@dataclass
class TrainConfig:
    val_fraction: float = 0.2
    max_epochs: int = 60
    patience: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-2
    batch_size: int = 256
    seed: int = 0
    width: int = 128
    depth: int = 2
    dropout: float = 0.1
    target_recall: float = 0.95
    eval_every: int = 0   # validate every N optimizer steps (0 = once per epoch); small data overfits within an epoch


@dataclass
class TrainResult:
    model: RouterMLP
    train_index: torch.Tensor
    val_index: torch.Tensor
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    pos_weight: float = 1.0


def split_by_sequence(seq_ids: torch.Tensor, val_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (train, val): whole sequences go to validation, chosen by a hash of (seed, sequence id),
    so the split is deterministic and does not move when sequences are added."""
    seqs = sorted(set(seq_ids.tolist()))
    ranked = sorted(seqs, key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    n_val = max(1, round(val_fraction * len(seqs))) if len(seqs) > 1 else 0
    val = set(ranked[:n_val])
    is_val = torch.tensor([int(s) in val for s in seq_ids.tolist()], dtype=torch.bool)
    return (~is_val).nonzero().flatten(), is_val.nonzero().flatten()


@torch.inference_mode()
def predict(model: RouterMLP, features: FeatureBatch, batch_size: int = 4096) -> torch.Tensor:
    """P(divergent) in float64, as NeuralStrategy computes it at serving."""
    m = copy.deepcopy(model).double().eval()
    out = [m.predict_proba(features.select(slice(i, i + batch_size))).double() for i in range(0, len(features), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def train_router(features: FeatureBatch, labels: torch.Tensor, seq_ids: torch.Tensor, config: TrainConfig = TrainConfig(),
                 quiet: bool = False, exclude_from_training: torch.Tensor | None = None) -> TrainResult:
    """`exclude_from_training` (bool per row): rows left out of the training split (e.g. proxy-labeled
    mismatches when the judge labeled only part of the data); the validation split is never filtered."""
    labels = torch.as_tensor(labels).float().reshape(-1)
    train_idx, val_idx = split_by_sequence(seq_ids, config.val_fraction, config.seed)
    if exclude_from_training is not None:
        train_idx = train_idx[~exclude_from_training.bool()[train_idx]]
    if len(val_idx) == 0:
        raise ValueError("need at least two sequences to hold one out for validation")
    tr_x, tr_y = features.select(train_idx), labels[train_idx]
    va_x, va_y = features.select(val_idx), labels[val_idx]
    n_pos = int(tr_y.sum())
    if n_pos == 0 or n_pos == len(tr_y):
        raise ValueError(f"the training split has {n_pos} divergent of {len(tr_y)} rows; training needs both classes")
    pos_weight = (len(tr_y) - n_pos) / n_pos
    rc = RouterConfig(hidden_size=features.hidden_size, top_k=features.top_k, width=config.width,
                      depth=config.depth, dropout=config.dropout)
    history: list[dict] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = RouterMLP(rc)
        g = torch.Generator().manual_seed(config.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(float(pos_weight)))
        best, best_state, best_epoch, waited = math.inf, copy.deepcopy(model.state_dict()), 0, 0
        steps_per_epoch = max(1, math.ceil(len(tr_y) / config.batch_size))
        if config.eval_every > 0:  # a "round" between validations: eval_every steps over a fresh permutation
            steps_per_epoch = config.eval_every
        with Progress("training the router", config.max_epochs, "epochs", quiet, every_s=5.0) as bar:
            for epoch in range(1, config.max_epochs + 1):
                model.train()
                perm = torch.randperm(len(tr_y), generator=g)
                total, seen = 0.0, 0
                for step in range(steps_per_epoch):
                    lo = (step * config.batch_size) % max(len(tr_y) - config.batch_size + 1, 1)
                    rows = perm[lo: lo + config.batch_size]
                    loss = loss_fn(model(tr_x.select(rows)), tr_y[rows])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(rows)
                    seen += len(rows)
                model.eval()
                with torch.inference_mode():
                    val_loss = float(loss_fn(model(va_x), va_y)) if len(va_y) else float("nan")
                    scores = torch.sigmoid(model(va_x)).double()
                point = {"epoch": epoch, "train_loss": total / max(seen, 1), "val_loss": val_loss,
                         "val_auc": auc(scores, va_y)}
                if va_y.sum() > 0:
                    t = threshold_for_recall(scores, va_y, config.target_recall)
                    point["val_share_at_target_recall"] = rates(scores, va_y, t)["llm_share"]
                    point["val_recall_at_0.5"] = rates(scores, va_y, 0.5)["recall"]
                history.append(point)
                bar.advance()
                if val_loss < best - 1e-4:
                    best, best_state, best_epoch, waited = val_loss, copy.deepcopy(model.state_dict()), epoch, 0
                else:
                    waited += 1
                    if waited >= config.patience:
                        break
        model.load_state_dict(best_state)
    say(f"training: best epoch {best_epoch} of {len(history)} (val loss {best:.4f}); "
        f"{len(train_idx)} train / {len(val_idx)} validation rows, pos_weight {pos_weight:.1f}", quiet)
    return TrainResult(model.eval(), train_idx, val_idx, history, best_epoch, pos_weight)


def plot_history(history: list[dict], path: str | Path, title: str = "router training") -> Path | None:
    """Loss (train/val) and validation AUC / LLM share at the target recall per epoch, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    a.plot(epochs, [h["val_loss"] for h in history], label="validation loss")
    a.set_xlabel("epoch")
    a.set_ylabel("weighted BCE")
    a.legend()
    b.plot(epochs, [h["val_auc"] for h in history], label="validation AUC")
    if any("val_recall_at_0.5" in h for h in history):
        b.plot(epochs, [h.get("val_recall_at_0.5", float("nan")) for h in history], label="validation recall @ 0.5")
        b.plot(epochs, [h.get("val_share_at_target_recall", float("nan")) for h in history],
               label="LLM share at target recall")
    b.set_xlabel("epoch")
    b.set_ylim(0, 1)
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=90)
    plt.close(fig)
    return p
