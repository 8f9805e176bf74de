"""The time-locating probes of bench/ on the tiny pair: bench.slm_path (the SLM path by layer) and
bench.spec_breakdown (HF assisted generation vs verify mode, forward by forward). Both start the services."""

from __future__ import annotations

import json
from pathlib import Path


def test_slm_path_times_every_layer_and_they_write_the_same_tokens(tmp_path, tiny_pair):
    from bench import slm_path

    tiny_dir = Path(tiny_pair["slm"]).parent
    rc = slm_path.main(["--tiny", str(tiny_dir), "--tokens", "8", "--rounds", "2", "--slm-dtype", "float32",
                        "--llm-dtype", "float32", "--out", str(tmp_path)])
    assert rc == 0
    out = json.loads(next(tmp_path.glob("slm_path-*.json")).read_text())
    assert set(out["median_ms_per_token"]) == {"hf", "worker", "service", "worker_inside"}
    assert all(len(v) == 2 and min(v) > 0 for v in out["ms_per_token"].values())
    # The worker's own time per item is part of the wall time the direct caller sees.
    assert out["median_ms_per_token"]["worker_inside"] <= out["median_ms_per_token"]["worker"]
    # Greedy in float32: the worker called directly and the whole service decode the bare model's tokens.
    assert out["tokens_agree"] == {"hf": True, "worker": True, "service": True}


def test_spec_breakdown_counts_forwards_and_verify_mode_answers_as_assisted(tmp_path, tiny_pair):
    from bench import spec_breakdown

    tiny_dir = Path(tiny_pair["slm"]).parent
    rc = spec_breakdown.main(["--tiny", str(tiny_dir), "--problems", "2", "--max-tokens", "9",
                              "--slm-dtype", "float32", "--llm-dtype", "float32", "--router", "top1",
                              "--thresholds", "2,0.5", "--verify", "1:2,1", "--out", str(tmp_path)])
    assert rc == 0
    out = json.loads(next(tmp_path.glob("spec_breakdown-*.json")).read_text())
    entries = out["entries"]
    assert set(entries) == {"assisted", "verify-1-draft2@2", "verify-1@2", "verify-1-draft2@0.5", "verify-1@0.5"}
    # Lossless both ways: every verify entry answers exactly as HF assisted generation does.
    assert set(out["same_answer_as_assisted"].values()) == {1.0}
    tokens = entries["assisted"]["tokens"]
    assert tokens > 0 and all(e["tokens"] == tokens for e in entries.values())
    a = entries["assisted"]
    assert a["slm_forwards"] >= 1 and a["llm_forwards"] >= 2 and a["llm_fed_tokens"] >= a["llm_forwards"]
    assert a["slm_s"] + a["llm_s"] <= a["wall_s"]
    # Drafts of 2: the LLM writes at least every third token (plus its prompt prefill)...
    assert entries["verify-1-draft2@2"]["llm_forwards"] >= tokens // 3
    # ... and with neither a draft length nor a router that routes, the LLM judges only where the answer
    # would end: one pass per rollback (the answer went on from there), plus at most one per answer that
    # accepted its whole tail; every rolled-back draft cost SLM forwards that wrote no kept token.
    never = entries["verify-1@2"]
    assert never["rollbacks"] <= never["llm_forwards"] <= never["rollbacks"] + out["problems"]
    assert never["slm_forwards"] >= tokens - never["llm_written"] + never["rollbacks"]


def test_draft_quality_grades_a_drafting_head_run_beside_the_saved_runs(tmp_path, tiny_pair):
    """bench.draft_quality reruns a saved harness R2R run with the SLM on a drafting head and grades all four."""
    from bench import draft_quality, humaneval

    keys = [p.task_id for p in humaneval.load_problems(2)]
    answers = tmp_path / "saved" / "answers"
    answers.mkdir(parents=True)
    canonical = {p.task_id: p.prompt + p.canonical_solution for p in humaneval.load_problems(2)}
    for name, text in (("r2r-0.1", None), ("llm-1", None), ("slm-0", "")):
        outcomes = [dict(key=k, text=canonical[k] if text is None else text, completion_tokens=4,
                         llm_share=0.5 if name == "r2r-0.1" else float(name == "llm-1")) for k in keys]
        (answers / f"{name}.json").write_text(json.dumps(dict(
            name=name, strategy="entropy", threshold=0.5, sessions=2, max_tokens=6, machine="m", date="d",
            outcomes=outcomes)))
    tiny_dir = Path(tiny_pair["slm"]).parent
    rc = draft_quality.main(["--tiny", str(tiny_dir), "--saved", str(tmp_path / "saved"), "--limit", "2",
                             "--slm-draft-vocab", "100", "--slm-dtype", "float32", "--llm-dtype", "float32",
                             "--out", str(tmp_path)])
    assert rc == 0
    out = json.loads(next(tmp_path.glob("draft_quality-*.json")).read_text())
    runs = out["runs"]
    assert set(runs) == {"r2r-0.1-draft100", "r2r-0.1", "llm-1", "slm-0"}
    # The saved canonical solutions pass and the empty answers fail: the grading ran for real.
    assert runs["r2r-0.1"]["pass1"] == runs["llm-1"]["pass1"] == 1.0 and runs["slm-0"]["pass1"] == 0.0
    assert runs["r2r-0.1"]["llm_share"] == 0.5 and 0.0 <= runs["r2r-0.1-draft100"]["llm_share"] <= 1.0
