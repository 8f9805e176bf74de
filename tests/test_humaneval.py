"""bench/humaneval.py: problems, prompt, answer extraction, the sandboxed official check, and evaluate()."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package

from bench.humaneval import (  # noqa: E402
    Problem,
    chat_messages,
    check_program,
    evaluate,
    extract_program,
    load_problems,
)

FULL_0 = """def has_close_elements(numbers: List[float], threshold: float) -> bool:
    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])
"""
WRONG_BODY = "    return None\n"


@pytest.fixture(scope="module")
def problems() -> list[Problem]:
    return load_problems()


@pytest.fixture(scope="module")
def p0(problems) -> Problem:
    return problems[0]


def run(problem: Problem, answer: str, timeout_s: float = 10.0):
    return check_program(problem, extract_program(problem, answer), timeout_s=timeout_s)


def gone(pid: int, wait_s: float = 3.0) -> bool:
    """No such process, or only a zombie waiting for a reaper that is not ours."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


# --- problems and prompt ------------------------------------------------------------------------------


def test_load_problems_in_task_order(problems):
    assert len(problems) == 164
    assert [p.task_id for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    assert problems[0].entry_point == "has_close_elements" and "def check(candidate)" in problems[0].test
    assert [p.task_id for p in load_problems(limit=3)] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]


def test_chat_messages_one_user_turn_with_the_prompt_in_a_python_block(p0):
    [message] = chat_messages(p0)
    assert message["role"] == "user"
    assert message["content"].startswith("Please provide a self-contained Python script")
    assert f"```python\n{p0.prompt.strip()}\n```" in message["content"]


# --- the official check, sandboxed --------------------------------------------------------------------


def test_every_canonical_solution_passes(problems):
    # The canonical solutions are body continuations (no fence): extract_program -> prompt + body.
    started = time.monotonic()
    report = evaluate(problems, {p.task_id: p.canonical_solution for p in problems}, workers=2, progress=False)
    failures = {k: v for k, v in report["results"].items() if not v["passed"]}
    assert failures == {}
    assert (report["pass@1"], report["passed"], report["problems"]) == (1.0, 164, 164)
    print(f"164 canonical solutions checked in {time.monotonic() - started:.1f} s with 2 workers")


def test_wrong_answer_fails_with_the_assertion(p0):
    result = run(p0, WRONG_BODY)
    assert (result.passed, result.status) == (False, "failed")
    assert "AssertionError" in result.detail and "assert candidate(" in result.detail


def test_endless_loop_times_out_and_the_process_group_is_gone(p0):
    # The program also undoes the in-child guard (which is no security boundary) to fork a grandchild:
    # the timeout must kill the whole group. For a non-root user RLIMIT_NPROC=0 stops the fork instead.
    body = """    import importlib, os, time
    os = importlib.reload(os)
    try:
        child = os.fork()
    except OSError:
        child = -1
    if child == 0:
        time.sleep(60)
        os._exit(0)
    print("pids", os.getpid(), child, flush=True)
    while True:
        pass
"""
    started = time.monotonic()
    result = run(p0, body, timeout_s=2.0)
    assert time.monotonic() - started < 6
    assert (result.passed, result.status) == (False, "timeout")
    assert result.detail.startswith("timed out after 2 s")
    pids = [int(x) for x in result.detail.split("pids", 1)[1].split()[:2]]
    assert gone(pids[0])
    if pids[1] > 0:
        assert gone(pids[1])


@pytest.mark.parametrize("attack", [
    "open({target!r}, 'w').write('pwned')",
    "__import__('pathlib').Path({target!r}).write_text('pwned')",
    "__import__('os').open({target!r}, __import__('os').O_WRONLY | __import__('os').O_CREAT)",
    "__import__('os').system('touch ' + {target!r})",
    "__import__('subprocess').run(['touch', {target!r}])",
    "__import__('shutil').rmtree({victim!r})",
    "__import__('os').remove({keep!r})",
])
def test_writes_outside_the_sandbox_fail_and_change_nothing(p0, tmp_path, attack):
    victim = tmp_path / "victim"
    victim.mkdir()
    keep = victim / "keep.txt"
    keep.write_text("safe")
    target = tmp_path / "pwned.txt"
    line = attack.format(target=str(target), victim=str(victim), keep=str(keep))
    result = run(p0, f"    {line}\n" + FULL_0.split("\n", 1)[1])
    assert (result.passed, result.status) == (False, "failed")
    assert "PermissionError" in result.detail
    assert not target.exists() and keep.read_text() == "safe"


def test_writing_inside_its_own_directory_and_printing_a_lot_still_pass(p0):
    body = "    open('scratch.txt', 'w').write('ok')\n    print('x' * 10_000_000)\n" + FULL_0.split("\n", 1)[1]
    result = run(p0, body)
    assert result.status == "passed", result.detail
    assert len(result.detail) <= 2100  # output is captured and truncated


def test_allocating_8_gib_fails_with_memory_error(p0):
    before = psutil.Process().memory_info().rss
    result = run(p0, "    blob = bytearray(8 << 30)\n    return True\n")
    assert (result.passed, result.status) == (False, "failed")
    assert "MemoryError" in result.detail
    assert psutil.Process().memory_info().rss - before < 256 << 20


def test_syntax_error_is_an_error_with_a_readable_detail(p0):
    result = run(p0, "    return (numbers[0]\n")
    assert (result.passed, result.status) == (False, "error")
    assert "does not compile" in result.detail and "SyntaxError" in result.detail


def test_exiting_early_is_not_a_pass(p0):
    result = run(p0, "    raise SystemExit(0)\n")
    assert (result.passed, result.status) == (False, "failed")
    assert "SystemExit" in result.detail


# --- extract_program ----------------------------------------------------------------------------------


def test_fenced_full_function_gets_the_prompt_imports(p0):
    answer = f"Here you go:\n\n```python\n{FULL_0}```\n"
    program = extract_program(p0, answer)
    assert program.startswith("from typing import List\n") and "Here you go" not in program
    assert program.count("def has_close_elements(") == 1
    assert check_program(p0, program).passed


def test_unfenced_continuation_is_appended_to_the_prompt(p0):
    body = FULL_0.split("\n", 1)[1]
    assert extract_program(p0, body) == p0.prompt + body
    assert check_program(p0, extract_program(p0, body)).passed


def test_unclosed_fence_from_a_cut_answer(p0):
    answer = "```python\nfrom typing import List\n\n" + FULL_0 + "\n\nif __name__ == '__main__':\n    print(has"
    program = extract_program(p0, answer)
    assert "```" not in program
    # The cut tail is a syntax error, reported as such; without it the same cut answer passes.
    assert run(p0, answer).status == "error"
    assert run(p0, "```python\n" + FULL_0).passed


def test_text_before_and_after_the_fence(p0):
    answer = f"Sure! The function:\n```python\n{FULL_0}```\nIt compares every pair.\nComplexity O(n^2)."
    program = extract_program(p0, answer)
    assert "Sure" not in program and "Complexity" not in program
    assert check_program(p0, program).passed


def test_multiple_fences_first_python_block_wins(p0):
    wrong = "def has_close_elements(numbers, threshold):\n    return None\n"
    answer = (f"Install nothing:\n```bash\necho hi\n```\nSolution:\n```python\n{FULL_0}```\n"
              f"A wrong variant:\n```python\n{wrong}```\nOutput:\n```\nTrue\n```\n")
    assert run(p0, answer).passed
    bare_first = f"```\n{FULL_0}```\n"
    assert run(p0, bare_first).passed  # no python tag anywhere: the bare block is the code
    python_after_bare = f"```\nTrue\n```\n```python\n{FULL_0}```\n"
    assert run(p0, python_after_bare).passed


def test_main_demo_in_the_answer_does_not_run(p0):
    answer = f"```python\n{FULL_0}\nif __name__ == '__main__':\n    print(input())\n```"
    assert run(p0, answer).passed


def test_full_function_without_the_given_helper(problems):
    p10 = problems[10]  # the prompt gives is_palindrome; the answer only writes make_palindrome
    answer = f"```python\ndef make_palindrome(string: str) -> str:\n{p10.canonical_solution}```"
    program = extract_program(p10, answer)
    assert "def is_palindrome(" in program
    assert check_program(p10, program).passed


def test_continuation_written_at_column_zero_is_indented(p0):
    body = "return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n"
    assert run(p0, body).passed


# --- evaluate -----------------------------------------------------------------------------------------


def test_evaluate_mix(problems):
    chosen = problems[:5]
    completions = {
        chosen[0].task_id: f"```python\n{FULL_0}```",  # right, full function
        chosen[1].task_id: chosen[1].canonical_solution,  # right, continuation
        chosen[2].task_id: WRONG_BODY,  # wrong
        chosen[3].task_id: "    return (\n",  # does not compile
        # chosen[4] has no completion
        "HumanEval/999": "ignored",
    }
    report = evaluate(chosen, completions, workers=2, progress=False)
    assert (report["passed"], report["problems"], report["pass@1"]) == (2, 5, 0.4)
    statuses = [report["results"][p.task_id]["status"] for p in chosen]
    assert statuses == ["passed", "passed", "failed", "error", "error"]
    assert list(report["results"]) == [p.task_id for p in chosen]
