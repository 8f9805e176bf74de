"""The user's path with real processes: `r2r serve` starts four services, `r2r generate` talks to them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

from r2r_serve.launcher import free_port

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def test_serve_answers_a_prompt_with_four_processes(tiny_pair, tmp_path):
    port = free_port()
    out = subprocess.run(
        [sys.executable, "-m", "r2r_serve.cli", "serve", "--tiny", str(tiny_pair["slm"].parent), "--port", str(port),
         "--log-dir", str(tmp_path / "logs"), "--prompt", "Write a Python function that reverses a string",
         "--max-tokens", "12", "--threshold", "0.9", "--color", "never", "--threads", "1"],
        capture_output=True, text=True, timeout=300, env=ENV)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"R2R coordinator listening on 127.0.0.1:{port}" in out.stdout
    summary = re.search(r"— (\d+) tokens · LLM wrote ([\d.]+)% \((\d+)\) · ([\d.]+) tok/s · TTFT ([\d.]+) s", out.stdout)
    assert summary, out.stdout
    tokens, llm = int(summary.group(1)), int(summary.group(3))
    assert 0 < tokens <= 12 and 0 <= llm <= tokens
    logs = {p.name for p in (tmp_path / "logs").iterdir()}
    assert logs == {"slm.log", "llm.log", "router.log", "coordinator.log"}
    # structured logs with request ids, and no prompt text at info level
    lines = [json.loads(l) for l in (tmp_path / "logs" / "coordinator.log").read_text().splitlines() if l.startswith("{")]
    finished = [l for l in lines if l["event"] == "request_finished"]
    assert finished and finished[0]["request_id"] and finished[0]["session_id"]
    assert not any("reverses a string" in json.dumps(l) for l in lines)


def test_generate_cli_against_a_running_serve(tiny_pair, tmp_path):
    port = free_port()
    serve = subprocess.Popen(
        [sys.executable, "-m", "r2r_serve.cli", "serve", "--tiny", str(tiny_pair["slm"].parent), "--port", str(port),
         "--log-dir", str(tmp_path / "logs"), "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        deadline = time.time() + 240
        for line in serve.stdout:
            if "R2R coordinator listening" in line or time.time() > deadline:
                break
        gen = subprocess.run([sys.executable, "-m", "r2r_serve.cli", "generate", "def add(a, b):", "--raw",
                              "--target", f"127.0.0.1:{port}", "--max-tokens", "6", "--threshold", "1.5", "--json"],
                             capture_output=True, text=True, timeout=120, env=ENV)
        assert gen.returncode == 0, gen.stderr
        result = json.loads(gen.stdout)
        assert result["stats"]["completion_tokens"] == len(result["token_ids"]) <= 6
        assert set(result["sources"]) <= {"slm"}
    finally:
        serve.send_signal(signal.SIGINT)
        assert serve.wait(60) == 0
