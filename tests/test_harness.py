"""The evaluation harness (bench/harness.py): its arithmetic, and one whole run on the tiny pair that must
produce the documented summary.json, the Markdown table and both plots."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import components as comp  # noqa: E402
from bench import answers, harness, report, runner  # noqa: E402
from bench.harness import main as harness_main  # noqa: E402

RUN_KEYS = {"name": str, "sessions": int, "tokens_per_s": float, "aggregate_tokens_per_s": float,
            "llm_share": float, "problems": int}


def table(**ms) -> comp.CostTable:
    return comp.CostTable({int(k[1:]): v for k, v in ms.items()})


def test_cost_table_interpolates_and_extrapolates():
    t = table(k1=10.0, k2=20.0, k8=50.0)
    assert t.at(1) == 10.0 and t.at(0.5) == 10.0
    assert t.at(5) == pytest.approx(35.0)
    assert t.at(14) == pytest.approx(80.0)  # past the last point: the last segment's slope


def test_cost_table_never_extrapolates_downwards():
    # One noisy repeat can time 32 tokens cheaper than 16: a long prompt must not cost less (or below zero).
    t = table(k1=5.0, k16=9.0, k32=8.0)
    assert t.at(24) == pytest.approx(8.5)  # between points: as measured
    assert t.at(32) == 8.0 and t.at(500) == 8.0
    assert table(k4=3.0).at(100) == 3.0  # one point: flat


def components(router_ms=1.0) -> comp.Components:
    return comp.Components(slm_prefill=table(k16=100.0, k32=200.0), slm_step_ms=10.0,
                           llm_forward=table(k1=30.0, k2=40.0, k16=100.0, k32=160.0), router_ms=router_ms,
                           context=256, repeats=1)


def test_ideal_cost_replays_provenance():
    c = components()
    # prompt 16 tokens; answer of 4 tokens, the LLM wrote tokens 1 and 3
    r2r = comp.ideal_seconds(["slm", "llm", "slm", "llm"], 16, c, "r2r")
    assert r2r["slm_s"] == pytest.approx((100 + 3 * 10) / 1000)
    assert r2r["router_s"] == pytest.approx(4 * 1.0 / 1000)
    # first catch-up: prompt + token 0 (17 new tokens); second: tokens 1..2 (2 new tokens)
    assert r2r["llm_s"] == pytest.approx((c.llm_forward.at(17) + c.llm_forward.at(2)) / 1000)
    assert r2r["total_s"] == pytest.approx(r2r["slm_s"] + r2r["router_s"] + r2r["llm_s"])
    llm = comp.ideal_seconds(["llm"] * 4, 16, c, "llm")
    assert llm["llm_s"] == pytest.approx((100 + 3 * 30) / 1000) and llm["slm_s"] == 0
    slm = comp.ideal_seconds(["slm"] * 4, 16, c, "slm")
    assert slm["total_s"] == pytest.approx(0.13) and slm["llm_s"] == 0


def test_pareto_front_keeps_only_unbeaten_points():
    pts = [(1.0, 50.0), (2.0, 40.0), (1.5, 30.0), (3.0, 40.0), (0.5, 60.0)]
    assert report.pareto_front(pts) == [(0.5, 60.0), (1.0, 50.0), (3.0, 40.0)]


def test_whole_run_on_the_tiny_pair_writes_the_documented_outputs(tmp_path, tiny_pair):
    out = tmp_path / "results"
    tiny_dir = Path(tiny_pair["slm"]).parent
    rc = harness_main(["--tiny", str(tiny_dir), "--limit", "3", "--max-tokens", "12", "--shares", "0.2",
                       "--speed-problems", "2", "--quality-sessions", "2", "--calibration-prompts", "2",
                       "--calibration-max-tokens", "8", "--sweep", "1,2", "--sweep-rounds", "1", "--sweep-max-tokens", "6",
                       "--component-context", "16", "--component-max-tokens", "32", "--component-repeats", "1",
                       "--skip-assisted", "--grade-workers", "2", "--llm-only-above-sessions", "1", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("machine", "date", "model_pair", "runs", "r2r_measured_over_ideal"):
        assert key in summary
    names = {r["name"] for r in summary["runs"]}
    assert {"slm", "llm", "r2r-entropy", "r2r-random", "r2r-entropy-prefetch", "r2r-entropy-nolookahead",
            "r2r-entropy-verify-0.1"} <= names
    for r in summary["runs"]:
        for key, kind in RUN_KEYS.items():
            assert isinstance(r[key], kind), (r["name"], key)
        assert r["threshold"] is None or isinstance(r["threshold"], float)
        assert r["humaneval_pass1"] is None or 0.0 <= r["humaneval_pass1"] <= 1.0
        assert 0.0 <= r["llm_share"] <= 1.0
    quality = {r["name"]: r for r in summary["runs"] if not r.get("sweep")}
    # Eager catch-up reschedules the LLM's reading only: same router, same threshold.
    for variant in ("prefetch", "nolookahead", "verify-0.1"):
        assert quality[f"r2r-entropy-{variant}"]["threshold"] == quality["r2r-entropy"]["threshold"]
    assert quality["r2r-entropy-verify-0.1"]["rollback_below"] == 0.1 and quality["r2r-entropy"]["rollback_below"] is None
    assert quality["slm"]["llm_share"] == 0.0 and quality["llm"]["llm_share"] == 1.0
    # The workers' forward seconds during each speed run, read from the workers themselves (GetLoad).
    slm_busy, llm_busy = quality["slm"]["workers_forward"], quality["llm"]["workers_forward"]
    assert slm_busy["slm_s"] > 0 and slm_busy["llm_s"] == 0, "an SLM-only run made the LLM work"
    assert llm_busy["llm_s"] > 0 and llm_busy["slm_s"] == 0, "an LLM-only run made the SLM work"
    for r in quality.values():
        if r["name"] != "assisted":
            assert 0 < r["workers_forward"]["workers_share"] <= 1.2 and r["service_overhead"] < 1
    assert summary["r2r_service_overhead"] is not None
    assert all(r["problems"] == 3 for r in quality.values())
    sweep = sorted(r["sessions"] for r in summary["runs"] if r.get("sweep") and r["name"] == "llm")
    assert sweep == [1, 2]
    # --llm-only-above-sessions 1: swept only (at one session it is the plain run); two sessions go to the LLM.
    adaptive = {r["sessions"]: r for r in summary["runs"] if r["name"] == "r2r-entropy-adaptive1"}
    assert sorted(adaptive) == [1, 2] and all(r.get("sweep") for r in adaptive.values())
    assert adaptive[2]["llm_share"] >= 0.5
    # Where the sweep's time goes: every request's prompt is a prefill on the pool that serves it, its
    # other tokens are decode steps; the other pool does nothing.
    for r in (r for r in summary["runs"] if r.get("sweep") and r["name"] in ("slm", "llm")):
        kinds = r["workers_forward"]["by_kind"]
        busy, idle = ("slm", "llm") if r["name"] == "slm" else ("llm", "slm")
        assert kinds[busy]["prefill_s"] > 0 and kinds[busy]["decode_s"] > 0, (r["name"], kinds)
        assert sum(kinds[idle].values()) == 0, (r["name"], kinds)
        assert abs(sum(kinds[busy].values()) - r["workers_forward"][f"{busy}_s"]) < 0.01
    assert "wall " in (out / "summary.md").read_text().split("| run | sessions |")[1]
    assert summary["r2r_measured_over_ideal"] > 0
    assert (out / "summary.md").read_text().startswith("| run |")
    for png in ("quality_vs_share.png", "quality_vs_speed.png", "sweep.png"):
        assert (out / png).stat().st_size > 5000


def test_time_split_names_each_pools_seconds_by_kind():
    workers = {"slm_s": 30.2, "llm_s": 21.0, "wall_s": 40.1,
               "by_kind": {"slm": {"prefill_s": 1.3, "decode_s": 28.9, "extend_s": 0.0},
                           "llm": {"prefill_s": 12.5, "decode_s": 0.0, "extend_s": 8.5}}}
    assert report.time_split(workers) == ("wall 40.1 s; SLM 30.2 (decode 28.9, prefill 1.3); "
                                          "LLM 21.0 (prefill 12.5, catch-up 8.5)")
    assert report.time_split(None) == "–"


def test_baseline_routers_can_run_at_fewer_shares_than_the_shipped_one():
    thresholds = {"neural": {0.1: 0.5, 0.2: 0.4}, "entropy": {0.1: 0.03, 0.2: 0.02}}
    plans = harness.plan_runs(thresholds, [0.1, 0.2], baseline_shares=[0.1])
    assert [(p["name"], p["target_share"]) for p in plans] == [
        ("slm", 0.0), ("llm", 1.0), ("r2r", 0.1), ("r2r", 0.2), ("r2r-entropy", 0.1)]
    assert plans[-1]["threshold"] == 0.03
    assert len(harness.plan_runs(thresholds, [0.1, 0.2])) == 6  # by default every router at every share
    # verify mode: the shipped router at the first share, right after its plain runs
    plans = harness.plan_runs(thresholds, [0.1, 0.2], rollbacks=[0.05])
    assert [p["name"] for p in plans] == ["slm", "llm", "r2r", "r2r", "r2r-verify-0.05", "r2r-entropy", "r2r-entropy"]
    assert plans[4] == dict(name="r2r-verify-0.05", strategy="neural", threshold=0.5, target_share=0.1,
                            rollback_below=0.05)


def test_paired_differences_name_the_problems_that_changed_hands():
    runs = [dict(name="llm", threshold=0.0, problems=3, passed_tasks=["a", "b"]),
            dict(name="r2r", threshold=0.5, problems=3, passed_tasks=["b", "c"]),
            dict(name="assisted", threshold=None, problems=2, passed_tasks=["a"])]  # other problems: not paired
    assert harness.paired_differences(runs) == {"r2r@0.5": {"only_llm_passes": ["a"], "only_this_passes": ["c"]}}


def test_quality_only_run_answers_and_grades_without_timing(tmp_path, tiny_pair):
    out = tmp_path / "results"
    tiny_dir = Path(tiny_pair["slm"]).parent
    rc = harness_main(["--tiny", str(tiny_dir), "--limit", "3", "--max-tokens", "10", "--shares", "0.2",
                       "--quality-sessions", "2", "--calibration-prompts", "2", "--calibration-max-tokens", "8",
                       "--baselines", "entropy", "--no-compare-lookahead", "--prefetch-min-tokens", "0",
                       "--rollback-below", "", "--quality-only", "--grade-workers", "2", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quality_only"] and summary["components"] is None
    assert not any(r.get("sweep") for r in summary["runs"]), "a quality-only run ran the sweep"
    assert {r["name"] for r in summary["runs"]} == {"slm", "llm", "r2r-entropy"}
    for r in summary["runs"]:
        assert r["sessions"] == 2 and r["problems"] == 3 and r["workers_forward"] is None
        assert len(r["passed_tasks"]) == round(3 * r["humaneval_pass1"])
    assert set(summary["paired"]) == {"slm@2", "r2r-entropy@" + format(summary["runs"][2]["threshold"], ".3g")}
    assert "2 sessions" in (out / "summary.md").read_text()
    # each run's answers were saved as it finished, and they are the answers that were graded
    files = {f.name: f for f in (out / "answers").glob("*.json")}
    saved = {json.loads(f.read_text())["name"]: json.loads(f.read_text()) for n, f in files.items()
             if n != answers.CALIBRATION}
    assert set(saved) == {"slm", "llm", "r2r-entropy"}
    for r in summary["runs"]:
        assert sorted(o["key"] for o in saved[r["name"]]["outcomes"]) == sorted(f"HumanEval/{i}" for i in range(3))

    # --resume: the saved SLM run and calibration are reused, the LLM run saved with another token budget and
    # the deleted entropy run are run again. Markers tell reused from rerun: the SLM's wall time, a threshold.
    slm_file, llm_file = files["slm-0.json"], files["llm-1.json"]
    slm_record = json.loads(slm_file.read_text()) | {"wall_s": 1234.5}
    slm_file.write_text(json.dumps(slm_record))
    llm_file.write_text(json.dumps(json.loads(llm_file.read_text()) | {"max_tokens": 99, "wall_s": 1234.5}))
    files["r2r-entropy-0.2.json"].unlink()
    cal = json.loads(files[answers.CALIBRATION].read_text())
    cal["entropy"]["thresholds"]["0.2"] = 0.987
    files[answers.CALIBRATION].write_text(json.dumps(cal))
    rc = harness_main(["--tiny", str(tiny_dir), "--limit", "3", "--max-tokens", "10", "--shares", "0.2",
                       "--quality-sessions", "2", "--calibration-prompts", "2", "--calibration-max-tokens", "8",
                       "--baselines", "entropy", "--no-compare-lookahead", "--prefetch-min-tokens", "0",
                       "--rollback-below", "", "--quality-only", "--grade-workers", "2", "--out", str(out), "--resume"])
    assert rc == 0
    resumed = {r["name"]: r for r in json.loads((out / "summary.json").read_text())["runs"]}
    slm_tokens = sum(o["completion_tokens"] for o in slm_record["outcomes"])
    assert resumed["slm"]["aggregate_tokens_per_s"] == pytest.approx(slm_tokens / 1234.5)
    llm_again = json.loads(llm_file.read_text())
    assert llm_again["max_tokens"] == 10 and llm_again["wall_s"] != 1234.5, "a run with another budget was reused"
    assert resumed["r2r-entropy"]["threshold"] == 0.987 and files["r2r-entropy-0.2.json"].exists()


def test_saved_runs_are_reused_only_when_they_are_the_planned_run(tmp_path):
    plan = dict(name="r2r", strategy="neural", threshold=0.47, target_share=0.1)
    outcome = runner.Outcome(key="HumanEval/0", text="x", sources=["slm", "llm"], probabilities=[0.1, 0.9],
                             prompt_tokens=5, completion_tokens=2, llm_share=0.5, ttft_s=0.1, total_s=0.3,
                             tokens_per_s=6.7, finish="eos")
    answers.save_run(tmp_path, plan, runner.RunResult([outcome], 12.0, 4), max_tokens=64)
    back = answers.load_run(tmp_path, plan, ["HumanEval/0"], 64)
    assert back.outcomes == [outcome] and back.wall_s == 12.0 and back.sessions == 4
    assert answers.load_run(tmp_path, plan | {"threshold": 0.48}, ["HumanEval/0"], 64) is None
    assert answers.load_run(tmp_path, plan, ["HumanEval/0", "HumanEval/1"], 64) is None
    assert answers.load_run(tmp_path, plan, ["HumanEval/0"], 128) is None
    assert answers.load_run(tmp_path, plan | {"target_share": 0.2}, ["HumanEval/0"], 64) is None
    answers.save_calibration(tmp_path, "neural", {"thresholds": {0.1: 0.47, 0.05: 0.6}, "positions": 900}, ["a"], 64)
    assert answers.load_calibration(tmp_path, "neural", [0.05, 0.1], ["a"], 64) == {
        "thresholds": {0.05: 0.6, 0.1: 0.47}, "positions": 900}
    assert answers.load_calibration(tmp_path, "neural", [0.2], ["a"], 64) is None  # a share not calibrated
    assert answers.load_calibration(tmp_path, "neural", [0.1], ["b"], 64) is None
    assert answers.load_calibration(tmp_path, "entropy", [0.1], ["a"], 64) is None


def test_grade_scores_saved_answers_files(tmp_path):
    """bench.grade: saved answers graded by the sandboxed HumanEval check, paired with the LLM's run."""
    from bench import grade, humaneval

    p0, p1 = humaneval.load_problems(2)
    right = lambda p: f"```python\n{p.prompt}{p.canonical_solution}```"  # noqa: E731
    wrong = lambda p: f"```python\ndef {p.entry_point}(*args):\n    return None\n```"  # noqa: E731

    def saved(name, threshold, texts, sources):
        outcomes = [runner.Outcome(key=p.task_id, text=t, sources=sources, probabilities=[], prompt_tokens=9,
                                   completion_tokens=len(sources), llm_share=0.0, ttft_s=0.1, total_s=1.0,
                                   tokens_per_s=1.0, finish="eos") for p, t in zip((p0, p1), texts)]
        plan = dict(name=name, strategy=None, threshold=threshold, target_share=threshold and 1.0)
        return answers.save_run(tmp_path, plan, runner.RunResult(outcomes, 4.0, 2), max_tokens=64)

    llm = saved("llm", 0.0, [right(p0), right(p1)], ["llm", "llm"])
    slm = saved("slm", 2.0, [wrong(p0), right(p1)], ["slm", "slm", "slm", "slm"])
    assert grade.main([str(llm), str(slm), "--workers", "2", "--json", str(tmp_path / "graded.json")]) == 0
    graded = json.loads((tmp_path / "graded.json").read_text())
    by_name = {r["name"]: r for r in graded["runs"]}
    assert by_name["llm"]["humaneval_pass1"] == 1.0 and by_name["llm"]["llm_share"] == 1.0
    assert by_name["slm"]["humaneval_pass1"] == 0.5 and by_name["slm"]["passed_tasks"] == [p1.task_id]
    assert by_name["slm"]["aggregate_tokens_per_s"] == 2.0  # 8 tokens in 4 s
    assert graded["paired"] == {"slm@2": {"only_llm_passes": [p0.task_id], "only_this_passes": []}}


def test_ab_rotates_modes_beside_the_r2r_coordinators(tmp_path, tiny_pair):
    """bench.ab --modes: the LLM alone and the SLM alone join the rotation on the plain coordinator; only the
    R2R entries' answers are compared, and each entry reports its ratio to R2R per round."""
    from bench import ab

    tiny_dir = Path(tiny_pair["slm"]).parent
    out = tmp_path / "ab"
    rc = ab.main(["--tiny", str(tiny_dir), "--problems", "2", "--rounds", "2", "--max-tokens", "8",
                  "--modes", "llm,slm", "--variant", "nolookahead=--no-lookahead", "--out", str(out)])
    assert rc == 0
    summary = json.loads(next(out.glob("ab-*.json")).read_text())
    variants = summary["variants"]
    assert set(variants) == {"plain", "nolookahead", "llm-only", "slm-only"}
    assert variants["llm-only"]["llm_share"] == 1.0 and variants["slm-only"]["llm_share"] == 0.0
    assert summary["compared"] == ["plain", "nolookahead"] and summary["outputs_agree"]
    assert all(len(v["aggregate_by_round"]) == 2 and v["vs_plain_by_round_median"] > 0 for v in variants.values())
    assert variants["plain"]["vs_plain_by_round_median"] == 1.0
    assert set(summary["versions"]) >= {"torch", "transformers"}


def test_ab_rotates_assisted_generation_beside_the_llm_alone(tmp_path, tiny_pair):
    """bench.ab --modes assisted: HF assisted generation (in-process, same pair) is timed in the rotation; in
    float32 it is lossless, so every answer equals the LLM alone's through the services."""
    from bench import ab

    tiny_dir = Path(tiny_pair["slm"]).parent
    out = tmp_path / "ab"
    rc = ab.main(["--tiny", str(tiny_dir), "--problems", "2", "--rounds", "2", "--max-tokens", "8",
                  "--slm-dtype", "float32", "--llm-dtype", "float32",
                  "--modes", "llm,assisted", "--verify", "1,1:2,1::0.9", "--variant", "none=", "--out", str(out)])
    assert rc == 0
    variants = json.loads(next(out.glob("ab-*.json")).read_text())["variants"]
    assert set(variants) == {"plain", "llm-only", "assisted", "verify-1", "verify-1-draft2", "verify-1-stop0.9"}
    assisted = variants["assisted"]
    assert len(assisted["aggregate_by_round"]) == 2 and assisted["tokens_per_s"] > 0
    assert assisted["llm_share"] == 1.0 and assisted["same_answer_as_llm"] == 1.0
    # Verify mode with rollback_below 1 through the services is lossless too: the LLM's own answers, at a
    # threshold (calibrated for a 10% share) where the SLM drafts most tokens.
    assert variants["plain"]["llm_share"] < 0.5
    assert variants["verify-1"]["same_answer_as_llm"] == 1.0
    # ... also with drafts of at most 2 tokens, where the LLM writes at least every third token.
    assert variants["verify-1-draft2"]["same_answer_as_llm"] == 1.0
    assert variants["verify-1-draft2"]["llm_share"] >= 1 / 3
    # ... and with a draft stop no proposal of the tiny random SLM reaches: the LLM writes every token.
    assert variants["verify-1-stop0.9"]["same_answer_as_llm"] == 1.0
    assert variants["verify-1-stop0.9"]["llm_share"] == 1.0


def test_ab_parses_verify_entries():
    from bench import ab

    assert ab.parse_verify("1,0.5:8,1:20:0.4,1::0.3") == [(1.0, None, None), (0.5, 8, None), (1.0, 20, 0.4),
                                                           (1.0, None, 0.3)]
    assert ab.verify_name(1.0, 20, 0.4) == "verify-1-draft20-stop0.4"
    for bad in ("x", "1:y", "1:2:3:4"):
        with pytest.raises(argparse.ArgumentTypeError):
            ab.parse_verify(bad)


def test_ab_refuses_an_unknown_mode_and_assisted_beyond_one_session():
    from bench import ab

    with pytest.raises(SystemExit):
        ab.parse_args(["--modes", "llm,gpu"])
    with pytest.raises(SystemExit):
        ab.parse_args(["--modes", "assisted", "--sessions", "4"])
    assert ab.parse_args(["--modes", "assisted"]).modes == ["assisted"]
    assert ab.parse_args(["--verify", "1,0.5:8"]).verify == [(1.0, None, None), (0.5, 8, None)]
    with pytest.raises(SystemExit):
        ab.parse_args(["--verify", "1:x"])
