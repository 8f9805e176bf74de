"""The router-training pipeline (issue #3) end to end on the tiny pair: every labeling stage, the dataset's
columns, features equal to the serving worker's, resumability, training + reload, calibration."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from r2r_serve.router.features import FeatureBatch
from r2r_serve.training import calibrate
from r2r_serve.training.cli import add_label_args, run_label, train_and_save
from r2r_serve.training.dataset import COLUMNS, load_dataset
from r2r_serve.training.prompts import build_prompts

TOP_K = 8
STAGE_FOLDERS = ("1-generate", "2-teacher", "3-continue", "4-verify", "dataset")


def label_args(out, tiny_pair, *extra):
    p = argparse.ArgumentParser()
    add_label_args(p)
    return p.parse_args(["--out", str(out), "--slm", str(tiny_pair["slm"]), "--llm", str(tiny_pair["llm"]),
                         "--prompts", "3", "--max-new-tokens", "10", "--continue-tokens", "5", "--top-k", str(TOP_K),
                         "--gen-batch", "2", "--teacher-batch", "2", "--continue-batch", "8", "--judge-batch", "8", "--judge-controls", "8",
                         "--quiet", *extra])


@pytest.fixture(scope="module")
def labeled(tiny_pair, tmp_path_factory):
    run = tmp_path_factory.mktemp("label-run")
    assert run_label(label_args(run, tiny_pair)) == 0
    return run


def test_prompt_set_is_deterministic_deduplicated_and_ours():
    a, b = build_prompts(40), build_prompts(40)
    assert a == b and len(a) == 40
    assert len({p["id"] for p in a}) == 40 and len({p["text"] for p in a}) == 40
    assert len({p["id"].rsplit(".", 1)[1] for p in a}) == 40  # one prompt per function name
    assert all(p["text"].startswith("Write a Python function `") for p in a)
    assert build_prompts(10) == a[:10]  # a bigger set extends a smaller one (a resumed run can grow)


def test_every_stage_writes_its_outputs(labeled):
    for stage in STAGE_FOLDERS:
        assert (labeled / stage / "summary.json").exists(), stage
    answers = [json.loads(line) for p in sorted((labeled / "1-generate").glob("part-*.jsonl"))
               for line in p.read_text().splitlines()]
    assert len(answers) == 3 and all(1 <= len(r["answer_ids"]) <= 10 for r in answers)
    conts = [json.loads(line) for p in sorted((labeled / "3-continue").glob("part-*.jsonl"))
             for line in p.read_text().splitlines()]
    assert conts and all(1 <= len(c["slm_cont"]) <= 5 and c["slm_cont"][0] == c["slm_token"] for c in conts)
    verdicts = [json.loads(line) for p in sorted((labeled / "4-verify").glob("part-*.jsonl"))
                for line in p.read_text().splitlines()]
    assert {v["key"] for v in verdicts} == {c["key"] for c in conts}
    assert all(v["verifier"] == "judge" and 0 <= v["p_divergent"] <= 1 and v["label"] == int(v["p_divergent"] >= 0.5)
               for v in verdicts)
    controls = json.loads((labeled / "4-verify" / "judge-controls.json").read_text())
    assert controls["n"] == 8 and controls["threshold"] >= 0.5
    # stage 5 labels judged mismatches at the measured threshold
    _, cols, stats = load_dataset(labeled)
    assert stats["verifier"]["judge_threshold"] == controls["threshold"]
    p = cols["p_divergent"][cols["mismatch"] == 1]
    assert bool((cols["labels"][cols["mismatch"] == 1] == (p >= controls["threshold"]).to(torch.uint8)).all())


def test_dataset_has_the_documented_columns(labeled):
    shards = sorted((labeled / "dataset").glob("shard-*.safetensors"))
    assert shards
    with safe_open(str(shards[0]), framework="pt") as f:
        assert set(f.keys()) == set(COLUMNS)
    features, cols, stats = load_dataset(labeled)
    n = len(features)
    assert n == stats["positions"] == sum(len(json.loads(line)["answer_ids"]) for p in (labeled / "1-generate").glob("part-*.jsonl")
                                          for line in p.read_text().splitlines())
    assert features.hidden.shape == (n, 32) and features.topk_logits.shape == (n, TOP_K)
    assert cols["hidden"].dtype == torch.float32 and cols["labels"].dtype == torch.uint8
    assert cols["entropy"].dtype == torch.float64 and cols["seq_id"].dtype == torch.int64
    features.validate()
    # identical tokens are neutral; labels are 0/1; the shares add up
    assert bool((cols["labels"][cols["mismatch"] == 0] == 0).all())
    assert bool((cols["mismatch"] == (cols["token_ids"] != cols["llm_token_ids"]).to(torch.uint8)).all())
    assert stats["identical_share"] + stats["neutral_share"] + stats["divergent_share"] == pytest.approx(1, abs=1e-4)
    assert stats["seconds_per_labeled_token"] > 0 and stats["slm_tokenizer_fingerprint"]


def test_features_equal_the_serving_workers(labeled, tiny_pair):
    """Teacher-forced features = what the SLM worker sends for the same prefix (its own router_features)."""
    from transformers import AutoModelForCausalLM

    from r2r_serve.worker.features import router_features

    slm = AutoModelForCausalLM.from_pretrained(str(tiny_pair["slm"]), dtype=torch.float32).eval()
    features, cols, _ = load_dataset(labeled)
    prompts = json.loads((labeled / "prompts.json").read_text())
    answers = {json.loads(line)["id"]: json.loads(line) for p in (labeled / "1-generate").glob("part-*.jsonl")
               for line in p.read_text().splitlines()}
    checked = 0
    for row in range(0, len(features), 3):
        rec = answers[prompts[int(cols["seq_id"][row])]["id"]]
        ids = rec["prompt_ids"] + rec["answer_ids"][: int(cols["position"][row])]
        with torch.inference_mode():
            hidden = slm.model(torch.tensor([ids])).last_hidden_state[:, -1]
            logits = slm.lm_head(hidden)
            token = logits.argmax(-1)
            proto = router_features(logits, hidden, token, slm.get_input_embeddings(), TOP_K, torch.float32)
        worker = FeatureBatch.from_protos(proto)
        assert int(worker.token_ids[0]) == int(features.token_ids[row])
        for name in ("hidden", "topk_logits", "token_embedding", "entropy", "top1_prob"):
            torch.testing.assert_close(getattr(worker, name)[0], getattr(features, name)[row], atol=2e-4, rtol=2e-4)
        checked += 1
    assert checked >= 5


def test_rerun_skips_finished_stages(labeled, tiny_pair):
    before = {p: p.stat().st_mtime_ns for stage in STAGE_FOLDERS[:4] for p in (labeled / stage).glob("*-*.*")}
    assert run_label(label_args(labeled, tiny_pair)) == 0
    after = {p: p.stat().st_mtime_ns for stage in STAGE_FOLDERS[:4] for p in (labeled / stage).glob("*-*.*")}
    assert before == after  # no part or shard was rewritten or added
    for stage in STAGE_FOLDERS[:4]:
        summary = json.loads((labeled / stage / "summary.json").read_text())
        assert summary["new"] == 0 and summary["skipped"] > 0, stage


def test_resume_refuses_changed_settings(labeled, tiny_pair):
    with pytest.raises(ValueError, match="other settings"):
        run_label(label_args(labeled, tiny_pair, "--max-new-tokens", "11"))


def test_proxy_verifier_and_judge_limit(labeled, tiny_pair, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(labeled, run)
    shutil.rmtree(run / "4-verify")
    shutil.rmtree(run / "dataset")
    assert run_label(label_args(run, tiny_pair, "--judge-limit", "3")) == 0
    verdicts = [json.loads(line) for p in (run / "4-verify").glob("part-*.jsonl") for line in p.read_text().splitlines()]
    assert sum(v["verifier"] == "judge" for v in verdicts) == 3
    assert all(v["label"] == v["proxy_label"] for v in verdicts if v["verifier"] == "proxy")
    summary = json.loads((run / "4-verify" / "summary.json").read_text())
    assert summary["judged"] == 3 and summary["proxy_judge_agreement"] is not None


def test_continuation_and_proxy_rules():
    from r2r_serve.training.continue_ import unit_finished
    from r2r_serve.training.verify import proxy_label

    assert not unit_finished("  ") and not unit_finished("\n") and not unit_finished("return x")
    assert unit_finished("return x\n") and unit_finished("It works. Then")
    assert proxy_label("  return x\n", " return  x\n") == 0
    assert proxy_label(" return x + 1\n", " print(y)\n") == 1
    assert proxy_label(" Python implementation name.", " name of the Python implementation.") == 0


def _relabeled(labeled, tmp_path):
    """The tiny models' verdicts are arbitrary; give the dataset a learnable label (high entropy = divergent)."""
    out = tmp_path / "data"
    out.mkdir()
    _, cols, stats = load_dataset(labeled)
    median = cols["entropy"].median()
    labels = (cols["entropy"] > median).to(torch.uint8)
    save_file({**{k: v.contiguous() for k, v in cols.items()}, "labels": labels}, str(out / "shard-00000.safetensors"),
              metadata={"vocab_size": str(stats["vocab_size"])})
    (out / "stats.json").write_text(json.dumps(stats))
    return out


def test_router_trains_calibrates_and_reloads_identically(labeled, tiny_pair, tmp_path):
    from transformers import AutoTokenizer

    from r2r_serve.common.tokenizer import fingerprint
    from r2r_serve.router.checkpoint import read_metadata
    from r2r_serve.router.strategies import load_strategy
    from r2r_serve.training.train import TrainConfig, predict, split_by_sequence

    data = _relabeled(labeled, tmp_path)
    ckpt = tmp_path / "router.safetensors"
    config = TrainConfig(val_fraction=0.34, max_epochs=6, patience=3, batch_size=16, width=16, depth=1)
    report = train_and_save(data, ckpt, config, quiet=True)
    assert (tmp_path / "router.png").exists() and (data / "train-report.json").exists()
    strategy = load_strategy("neural", str(ckpt))
    meta = read_metadata(ckpt)
    assert meta.slm_tokenizer_fingerprint == fingerprint(AutoTokenizer.from_pretrained(str(tiny_pair["slm"])))
    assert meta.threshold_curve and meta.default_threshold == report["default_threshold"]
    assert strategy.default_threshold == meta.default_threshold and strategy.top_k == TOP_K
    with safe_open(str(ckpt), framework="pt") as f:  # no embedding table in the checkpoint
        assert all(f.get_slice(k).get_shape()[0] < 384 for k in f.keys())
    features, cols, _ = load_dataset(data)
    _, val = split_by_sequence(cols["seq_id"], config.val_fraction, config.seed)
    val_x, val_y = features.select(val), cols["labels"][val]
    # reloaded outputs are identical to the trained model's, and the default threshold meets the recall
    from r2r_serve.router.checkpoint import load_checkpoint

    loaded = load_checkpoint(ckpt).model
    assert torch.equal(predict(loaded, val_x), strategy.score(val_x))
    scores = strategy.score(val_x)
    assert calibrate.rates(scores, val_y, meta.default_threshold)["recall"] >= 0.95
    assert report["metrics"]["at_default_threshold"]["recall"] >= 0.95
    share_t = report["thresholds"]["share_0.2"]
    assert calibrate.rates(scores, val_y, share_t)["llm_share"] <= 0.2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_calibration_meets_the_requested_recall_and_share(seed):
    g = np.random.default_rng(seed)
    labels = g.random(500) < 0.1
    scores = np.clip(g.normal(0.3 + 0.3 * labels, 0.15), 0, 1)
    scores[:20] = 0.5  # ties
    for target in (0.5, 0.8, 0.95, 1.0):
        t = calibrate.threshold_for_recall(scores, labels, target)
        r = calibrate.rates(scores, labels, t)["recall"]
        assert r >= target
        # as the router service compares (float32), and as large as possible
        assert (np.float32(scores[labels]) >= np.float32(t)).mean() >= target
        higher = np.sort(scores[labels & (scores > t)])
        if higher.size:
            assert calibrate.rates(scores, labels, higher[0] + 1e-12)["recall"] < target
    for share in (0.0, 0.05, 0.1, 0.5):
        t = calibrate.threshold_for_share(scores, share)
        assert calibrate.rates(scores, labels, t)["llm_share"] <= share
    curve = calibrate.threshold_curve(scores, labels)
    shares = [p.llm_share for p in curve]
    assert shares == sorted(shares, reverse=True)
    t = calibrate.threshold_for_share_from_curve(curve, 0.1)
    assert calibrate.rates(scores, labels, t)["llm_share"] <= 0.1 + 1e-9


def test_auc_matches_pairwise_count():
    g = np.random.default_rng(3)
    labels = g.random(200) < 0.3
    scores = np.round(g.random(200), 2)  # ties
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (pos.size * neg.size)
    assert calibrate.auc(scores, labels) == pytest.approx(pairwise, abs=1e-12)
