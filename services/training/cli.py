"""`r2r label ...` and `r2r train-router ...`: argument definitions and runners (wired in r2r_serve.cli)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

STAGES = ("generate", "teacher", "continue", "verify", "dataset")


# ---- r2r label -----------------------------------------------------------------------------------
def add_label_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run folder: one sub-folder per stage; re-running resumes")
    p.add_argument("--slm", help="SLM folder or id (default: the prepared default pair's SLM)")
    p.add_argument("--llm", help="LLM folder or id (default: the prepared default pair's LLM)")
    p.add_argument("--prompts", type=int, default=64, help="number of prompts from the built-in set (stdlib "
                   "function signatures + docstrings); a resumed run may grow it")
    p.add_argument("--prompts-file", help="use these prompts instead (JSON lines with \"text\", or one per line)")
    p.add_argument("--max-new-tokens", type=int, default=160, help="cap on each LLM answer")
    p.add_argument("--continue-tokens", type=int, default=24, help="cap on each continuation (stage 3)")
    p.add_argument("--top-k", type=int, default=100, help="top-k logits in the features (the worker's default)")
    p.add_argument("--verifier", choices=["judge", "proxy"], default="judge")
    p.add_argument("--judge-limit", type=int, default=None,
                   help="judge at most N mismatches (a fixed random sample); the proxy labels the rest")
    p.add_argument("--judge-threshold", type=float, default=None,
                   help="P(divergent) from which the judge's verdict is 'divergent' (default: measured on identical "
                        "control pairs in stage 4, at least 0.5)")
    p.add_argument("--judge-controls", type=int, default=64, help="identical pairs to measure the judge's bias on")
    p.add_argument("--judge-val-first", type=float, default=0.2, metavar="FRACTION",
                   help="judge first the mismatches of the sequences that `r2r train-router --val-fraction FRACTION` "
                        "(seed 0) holds out, so validation labels all come from the judge (0 = no priority)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--slm-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "float64"])
    p.add_argument("--llm-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "float64"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--gen-batch", type=int, default=16, help="prompts per generation batch (stage 1)")
    p.add_argument("--teacher-batch", type=int, default=8, help="sequences per SLM forward (stage 2)")
    p.add_argument("--continue-batch", type=int, default=32, help="mismatches per continuation batch (stage 3)")
    p.add_argument("--judge-batch", type=int, default=16, help="mismatches per judge forward (stage 4)")
    p.add_argument("--stop-after", choices=STAGES, default="dataset", help="run the stages up to this one")
    p.add_argument("--quiet", action="store_true")


def _pair(args) -> tuple[str, str]:
    from r2r_serve.models.registry import default_pair, resolve_model

    if args.slm and args.llm:
        return resolve_model(args.slm), resolve_model(args.llm)
    slm, llm = default_pair()
    return resolve_model(args.slm) if args.slm else slm, resolve_model(args.llm) if args.llm else llm


def _prompt_set(args, run_dir: Path) -> list[dict]:
    from r2r_serve.training.common import atomic_write_text
    from r2r_serve.training.prompts import build_prompts, load_prompts_file

    wanted = load_prompts_file(args.prompts_file) if args.prompts_file else build_prompts(args.prompts)
    path = run_dir / "prompts.json"
    if path.exists():
        old = json.loads(path.read_text())
        if wanted[: len(old)] != old[: len(wanted)]:
            raise ValueError(f"{path} holds another prompt set than the one asked for; use a new --out folder")
        if len(wanted) <= len(old):
            return old
    atomic_write_text(path, json.dumps(wanted, indent=1, ensure_ascii=False))
    return wanted


def run_label(args) -> int:
    import torch

    from r2r_serve.common.tokenizer import fingerprint
    from r2r_serve.training.common import atomic_write_text, auto_dtype, load_lm, model_name, say
    from r2r_serve.training.continue_ import run_continue
    from r2r_serve.training.dataset import run_dataset
    from r2r_serve.training.generate import run_generate
    from r2r_serve.training.teacher import run_teacher
    from r2r_serve.training.verify import run_verify

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = Path(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    slm_path, llm_path = _pair(args)
    prompts = _prompt_set(args, run_dir)
    last = STAGES.index(args.stop_after)
    started = time.perf_counter()
    say(f"labeling {len(prompts)} prompts into {run_dir} (SLM {slm_path}, LLM {llm_path})", args.quiet)
    llm_dtype, slm_dtype = auto_dtype(args.device, args.llm_dtype), auto_dtype(args.device, args.slm_dtype)
    llm = None

    def get_llm():
        nonlocal llm
        if llm is None:
            llm = load_lm(llm_path, args.device, llm_dtype)
        return llm

    run_generate(get_llm(), prompts, run_dir, args.max_new_tokens, args.gen_batch, args.quiet)
    info = {"slm_path": slm_path, "llm_path": llm_path, "slm_name": model_name(slm_path), "llm_name": model_name(llm_path),
            "llm_dtype": llm_dtype, "slm_dtype": slm_dtype, "device": args.device, "top_k": args.top_k,
            "max_new_tokens": args.max_new_tokens, "continue_tokens": args.continue_tokens,
            "verifier": args.verifier, "judge_limit": args.judge_limit, "prompts": len(prompts)}
    if last >= 1:
        llm_fp = fingerprint(get_llm().tokenizer)
        llm = None  # free the LLM's memory while the SLM runs
        slm = load_lm(slm_path, args.device, slm_dtype)
        info["slm_tokenizer_fingerprint"] = fingerprint(slm.tokenizer)
        if info["slm_tokenizer_fingerprint"] != llm_fp:
            raise ValueError(f"SLM {slm_path} and LLM {llm_path} have different tokenizers; R2R needs a shared one")
        run_teacher(slm, run_dir, args.top_k, args.teacher_batch, args.quiet)
        del slm
    atomic_write_text(run_dir / "run.json", json.dumps(info, indent=2, sort_keys=True))
    if last >= 2:
        run_continue(get_llm(), run_dir, args.continue_tokens, args.continue_batch, args.quiet)
    if last >= 3:
        first = set()
        if args.judge_val_first > 0:
            from r2r_serve.training.teacher import load_sequences
            from r2r_serve.training.train import split_by_sequence

            seq_ids = torch.tensor([s["seq"] for s in load_sequences(run_dir) if s["answer_ids"]], dtype=torch.long)
            _, val = split_by_sequence(seq_ids, args.judge_val_first, 0)
            first = set(seq_ids[val].tolist())
        run_verify(get_llm() if args.verifier == "judge" else None, run_dir, args.verifier, args.judge_batch,
                   args.judge_limit, args.quiet, first_seqs=first, controls=args.judge_controls)
    if last >= 4:
        extra = {k: info.get(k) for k in ("slm_name", "llm_name", "slm_tokenizer_fingerprint", "llm_dtype", "slm_dtype",
                                           "max_new_tokens", "continue_tokens", "top_k")}
        run_dataset(run_dir, args.quiet, extra_stats=extra, judge_threshold=args.judge_threshold)
    say(f"label: done in {time.perf_counter() - started:.0f}s (this invocation)", args.quiet)
    return 0


# ---- r2r train-router ----------------------------------------------------------------------------
def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="a labeled run folder (or its dataset/ folder) from `r2r label`")
    p.add_argument("--out", required=True, help="router checkpoint to write (.safetensors)")
    p.add_argument("--plot", help="loss/recall plot (PNG; default: next to the checkpoint, .png)")
    p.add_argument("--report", help="metrics JSON (default: <data>/train-report.json)")
    p.add_argument("--target-recall", type=float, default=0.95, help="recall of divergent tokens for the threshold")
    p.add_argument("--target-share", type=float, default=None,
                   help="choose the default threshold for this LLM-token share instead of the target recall")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of sequences held out for validation")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--patience", type=int, default=8, help="epochs without a better validation loss before stopping")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=0, help="validate every N optimizer steps (0 = every epoch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--proxy-rows", choices=["drop", "keep"], default="drop",
                   help="mismatches labeled by the proxy instead of the judge (--judge-limit): leave them out of "
                        "the training split (drop) or train on the proxy's labels (keep)")
    p.add_argument("--quiet", action="store_true")


def train_and_save(data: str | Path, out: str | Path, config=None, target_share: float | None = None,
                   plot: str | Path | None = None, report: str | Path | None = None, quiet: bool = False,
                   proxy_rows: str = "drop") -> dict:
    """Load a labeled dataset, train, calibrate on the validation split, write the checkpoint; returns the
    report (also written as JSON)."""
    from r2r_serve.router.checkpoint import CheckpointMeta, save_checkpoint
    from r2r_serve.training.calibrate import (auc, entropy_baseline, rates, threshold_curve, threshold_for_recall,
                                              threshold_for_share)
    from r2r_serve.training.common import atomic_write_text, say
    from r2r_serve.training.dataset import load_dataset
    from r2r_serve.training.train import TrainConfig, plot_history, predict, train_router

    config = config or TrainConfig()
    features, cols, stats = load_dataset(data)
    labels = cols["labels"].long()
    proxy = (cols["mismatch"] == 1) & (cols["p_divergent"] < 0)
    result = train_router(features, labels, cols["seq_id"], config, quiet,
                          exclude_from_training=proxy if proxy_rows == "drop" else None)
    val_proxy = int(proxy[result.val_index].sum())
    if val_proxy:
        say(f"note: {val_proxy} validation rows carry proxy labels (the judge did not reach them)", quiet)
    val_x, val_y = features.select(result.val_index), labels[result.val_index]
    scores = predict(result.model, val_x)
    t_recall = threshold_for_recall(scores, val_y, config.target_recall)
    thresholds = {f"recall_{config.target_recall:g}": t_recall}
    for share in (0.05, 0.1, 0.15, 0.2):
        thresholds[f"share_{share:g}"] = threshold_for_share(scores, share)
    if target_share is not None:
        default = threshold_for_share(scores, target_share)
        rule = f"LLM share <= {target_share:g} on the validation split"
    else:
        default = t_recall
        rule = f"recall of divergent tokens >= {config.target_recall:g} on the validation split"
    at_default = rates(scores, val_y, default)
    metrics = {"val_rows": len(val_y), "val_divergent": int(val_y.sum()), "val_sequences": int(cols["seq_id"][result.val_index].unique().numel()),
               "train_rows": len(result.train_index), "train_divergent": int(labels[result.train_index].sum()),
               "proxy_rows": int(proxy.sum()), "proxy_rows_in_validation": val_proxy, "proxy_rows_policy": proxy_rows,
               "val_auc": auc(scores, val_y), "at_default_threshold": at_default,
               "at_share": {k: rates(scores, val_y, v) for k, v in thresholds.items()},
               "entropy_baseline_at_equal_share": entropy_baseline(val_x, val_y, at_default["llm_share"]),
               "entropy_baseline_at_share": {f"share_{s:g}": entropy_baseline(val_x, val_y, s) for s in (0.05, 0.1, 0.15, 0.2)}}
    curve = threshold_curve(scores, val_y)
    training = {"data": {k: stats.get(k) for k in ("positions", "sequences", "mismatches", "divergent", "identical_share",
                                                   "neutral_share", "divergent_share", "seconds_per_labeled_token",
                                                   "verifier", "max_new_tokens", "continue_tokens")},
                "config": vars(config) if hasattr(config, "__dict__") else {}, "best_epoch": result.best_epoch,
                "epochs_run": len(result.history), "pos_weight": round(result.pos_weight, 3),
                "default_threshold_rule": rule, "thresholds": thresholds, "metrics": metrics}
    meta = CheckpointMeta.for_model(result.model, slm_name=stats.get("slm_name") or "", llm_name=stats.get("llm_name") or "",
                                    slm_tokenizer_fingerprint=stats.get("slm_tokenizer_fingerprint") or "",
                                    default_threshold=float(default), threshold_curve=curve, training=training)
    path = save_checkpoint(out, result.model, meta)
    plot_path = plot_history(result.history, plot or Path(out).with_suffix(".png"),
                             f"router for {stats.get('slm_name', 'SLM')} · {len(labels)} positions")
    full = {"checkpoint": str(path), "plot": str(plot_path) if plot_path else None, "default_threshold": default,
            **training, "history": result.history}
    report_path = Path(report) if report else (Path(data) / "train-report.json")
    atomic_write_text(report_path, json.dumps(full, indent=2, default=float))
    eb = metrics["entropy_baseline_at_equal_share"]
    say(f"router: {path} · threshold {default:.4g} ({rule}) · validation recall {at_default['recall']:.3f}, "
        f"precision {at_default['precision']:.3f}, LLM share {at_default['llm_share']:.3f}, AUC {metrics['val_auc']:.3f} · "
        f"entropy baseline at that share: recall {eb['recall']:.3f} (AUC {eb['auc']:.3f})", quiet)
    return full


def run_train(args) -> int:
    from r2r_serve.training.train import TrainConfig

    config = TrainConfig(val_fraction=args.val_fraction, max_epochs=args.epochs, patience=args.patience, lr=args.lr,
                         weight_decay=args.weight_decay, batch_size=args.batch_size, seed=args.seed, width=args.width,
                         depth=args.depth, dropout=args.dropout, target_recall=args.target_recall,
                         eval_every=args.eval_every)
    train_and_save(args.data, args.out, config, args.target_share, args.plot, args.report, args.quiet, args.proxy_rows)
    return 0


def main(argv=None) -> int:
    """`python -m r2r_serve.training.cli label|train-router ...` until the `r2r` command wires them."""
    parser = argparse.ArgumentParser(prog="python -m r2r_serve.training.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    add_label_args(sub.add_parser("label", help="label SLM tokens with the LLM (stages 1-5)"))
    add_train_args(sub.add_parser("train-router", help="train and calibrate a router on a labeled run"))
    args = parser.parse_args(argv)
    return run_label(args) if args.command == "label" else run_train(args)


if __name__ == "__main__":
    raise SystemExit(main())
