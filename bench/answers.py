"""Finished runs and calibrations on disk, so a long harness run can stop and go on where it stopped.

A quality pass over all 164 HumanEval problems takes hours on a CPU; sessions are time-boxed and a machine can
go away. Each run's answers are written the moment it finishes (`<out>/answers/<run>-<share>.json`), and the
threshold calibration as soon as it is done (`<out>/answers/calibration.json`). With `--resume` the harness
reads both back and runs only what is missing. A saved run is reused only when it is exactly the run planned
now (same router, threshold, target share, problems and token budget); anything else is run again.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

from bench import runner
from bench.machine import machine_description

CALIBRATION = "calibration.json"


def run_path(out_dir: Path, plan: dict) -> Path:
    return Path(out_dir) / "answers" / f"{plan['name']}-{plan['target_share']:g}.json"


def save_run(out_dir: Path, plan: dict, result: runner.RunResult, max_tokens: int, device: str = "cpu") -> Path:
    path = run_path(out_dir, plan)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = dict(plan, sessions=result.sessions, wall_s=result.wall_s, max_tokens=max_tokens,
                  machine=machine_description(device), date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  outcomes=[dataclasses.asdict(o) for o in result.outcomes])
    path.write_text(json.dumps(record))
    return path


def load_run(out_dir: Path, plan: dict, keys: list[str], max_tokens: int, device: str = "cpu") -> runner.RunResult | None:
    """The saved result of `plan` over `keys`, or None when there is none or it is not the same run. A run from
    another machine is not the same run (its speed and its bf16 rounding differ). Records written before
    max_tokens and the machine were saved are taken at their word on them."""
    path = run_path(out_dir, plan)
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    same_plan = all(record.get(k) == plan[k] for k in ("name", "strategy", "target_share")) and \
        _same_threshold(record.get("threshold"), plan["threshold"])
    same_work = [o["key"] for o in record["outcomes"]] == list(keys) and record.get("max_tokens", max_tokens) == max_tokens
    here = machine_description(device)
    if not (same_plan and same_work and record.get("machine", here) == here):
        return None
    outcomes = [runner.Outcome(**o) for o in record["outcomes"]]
    return runner.RunResult(outcomes, record["wall_s"], record["sessions"])


def save_calibration(out_dir: Path, strategy: str, calibration: dict, keys: list[str], max_tokens: int) -> None:
    path = Path(out_dir) / "answers" / CALIBRATION
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = json.loads(path.read_text()) if path.exists() else {}
    saved[strategy] = {"thresholds": {f"{s!r}": t for s, t in calibration["thresholds"].items()},
                       "positions": calibration["positions"], "prompts": list(keys), "max_tokens": max_tokens}
    path.write_text(json.dumps(saved, indent=1))


def load_calibration(out_dir: Path, strategy: str, shares: list[float], keys: list[str], max_tokens: int) -> dict | None:
    """A saved calibration of `strategy` that covers every share, made on the same prompts and budget."""
    path = Path(out_dir) / "answers" / CALIBRATION
    if not path.exists():
        return None
    saved = json.loads(path.read_text()).get(strategy)
    if not saved or saved["prompts"] != list(keys) or saved["max_tokens"] != max_tokens:
        return None
    thresholds = {float(s): t for s, t in saved["thresholds"].items()}
    if not all(s in thresholds for s in shares):
        return None
    return {"thresholds": {s: thresholds[s] for s in shares}, "positions": saved["positions"]}


def _same_threshold(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a - b) <= 1e-12 * max(1.0, abs(b))
