"""The labelled set for routing between a small and a large model, and its graders (stdlib only).

The set is bench/data/routing_eval.jsonl, written for this project by data/make_routing_eval.py
(edit that script, not the JSONL). One JSON object per line, one chat turn each:

    id           unique, "code-001", "math-001", "fact-001", ...
    kind         "code" | "arithmetic" | "fact"
    prompt       the user message (under 300 characters)
    difficulty   optional: "easy" | "medium" | "hard" (the author's estimate, code items only)
    code:        entry_point  the function the prompt asks for
                 tests        Python source of assert statements calling it
                 reference    optional: a correct solution (the unit tests check the tests with it)
    arithmetic:  answer       the exact integer or decimal, as a string ("-35", "22.1")
    fact:        answers      accepted answers, a non-empty list of strings

Grading, `grade(item, answer_text)`; it never raises on what a model wrote:

    code        The code is the first ```python (or ```py) block of the answer, else its first fenced
                block of any kind, else everything after an opening fence that was never closed (a
                reply cut off at max_tokens), else the whole text. It runs, followed by the item's
                tests, in a subprocess; the answer passes when that process exits with status 0.
                The subprocess: `python -I -B` (isolated: no PYTHON* variables, no user site, the
                script's directory not on sys.path), cwd a fresh temporary directory, a minimal
                environment (HOME and TMPDIR point into that directory), stdin from /dev/null,
                stdout and stderr to a file there (read back truncated), its own process group
                (killed whole on the wall-clock timeout). Before the answer runs, the subprocess
                limits itself (resource.setrlimit): CPU seconds, 1 GiB of address space, 1 MiB per
                written file, no core dumps, 64 open files, no new processes (RLIMIT_NPROC, which
                Linux does not enforce for root). It also installs an audit hook (sys.addaudithook)
                that refuses writing, deleting or renaming outside its directory, starting
                processes, sockets, loading libraries or calling functions through ctypes
                (importing it is allowed: numpy does), raising the limits, and signals. The limits are set in
                the child, not in a preexec_fn, because preexec_fn is unsafe in a threaded parent
                and grade_many grades from threads. The answer runs as module "solution" (an
                `if __name__ == "__main__":` block does not run); exiting early is a failure. This
                contains accidents in model output; it is not a boundary against hostile code.
    arithmetic  The last number in the answer ("1,234" and "-17" and "3.5" are numbers; a final
                period is punctuation; a Unicode minus counts), compared with `answer` as a Decimal:
                "42.0" matches "42". No number: wrong.
    fact        Both sides normalised (accents removed, case folded, every run of punctuation and
                whitespace one space); right when an accepted answer occurs as whole words in the
                answer: "Paris, France" matches "Paris", "Parisian" does not. An answer that names
                several candidates, the right one among them, counts as right.
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
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Sequence

DATA_PATH = Path(__file__).parent / "data" / "routing_eval.jsonl"
KINDS = ("code", "arithmetic", "fact")
DIFFICULTIES = ("easy", "medium", "hard")
MAX_OUTPUT_CHARS = 16_000          # of a code run's output kept in CodeRun.output


@dataclass(frozen=True)
class EvalItem:
    id: str
    kind: str
    prompt: str
    difficulty: str | None = None
    entry_point: str | None = None   # code
    tests: str | None = None         # code
    reference: str | None = None     # code, optional
    answer: str | None = None        # arithmetic
    answers: tuple[str, ...] = ()    # fact


# ---------------------------------------------------------------------------------------- loading

_FIELDS = {"code": {"entry_point", "tests", "reference"}, "arithmetic": {"answer"}, "fact": {"answers"}}
_COMMON = {"id", "kind", "prompt", "difficulty"}


def load_items(path: str | Path | None = None) -> list[EvalItem]:
    """The items of a JSONL file (default: the bundled set), validated; ValueError names the bad line."""
    path = Path(path) if path is not None else DATA_PATH
    items: list[EvalItem] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = _parse(line)
                if item.id in seen:
                    raise ValueError(f"duplicate id {item.id!r}")
            except ValueError as e:
                raise ValueError(f"{path}, line {number}: {e}") from None
            seen.add(item.id)
            items.append(item)
    return items


def _parse(line: str) -> EvalItem:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    kind = record.get("kind")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    unknown = set(record) - _COMMON - _FIELDS[kind]
    if unknown:
        raise ValueError(f"fields not used by a {kind} item: {', '.join(sorted(unknown))}")
    for key in ("id", "prompt"):
        _need_text(record, key)
    difficulty = record.get("difficulty")
    if difficulty is not None and difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {', '.join(DIFFICULTIES)}, not {difficulty!r}")
    common = {"id": record["id"], "kind": kind, "prompt": record["prompt"], "difficulty": difficulty}
    if kind == "code":
        _need_text(record, "entry_point")
        _need_text(record, "tests")
        if not record["entry_point"].isidentifier():
            raise ValueError(f"entry_point {record['entry_point']!r} is not a Python name")
        reference = record.get("reference")
        if reference is not None and not isinstance(reference, str):
            raise ValueError("reference must be a string")
        return EvalItem(**common, entry_point=record["entry_point"], tests=record["tests"], reference=reference)
    if kind == "arithmetic":
        _need_text(record, "answer")
        if _decimal(record["answer"]) is None:
            raise ValueError(f"answer {record['answer']!r} is not a number")
        return EvalItem(**common, answer=record["answer"])
    answers = record.get("answers")
    if not isinstance(answers, list) or not answers or \
            not all(isinstance(a, str) and normalize_text(a) for a in answers):
        raise ValueError("answers must be a non-empty list of non-empty strings")
    return EvalItem(**common, answers=tuple(answers))


def _need_text(record: dict[str, Any], key: str) -> None:
    if not isinstance(record.get(key), str) or not record[key].strip():
        raise ValueError(f"{key} must be a non-empty string")


# ---------------------------------------------------------------------------------------- grading

def grade(item: EvalItem, answer_text: str, timeout_s: float = 5.0) -> bool:
    """Whether `answer_text` answers `item` correctly (see the module docstring); never raises on the answer."""
    if not isinstance(answer_text, str):
        return False
    if item.kind == "code":
        return run_code(extract_code(answer_text), item.tests or "", timeout_s).passed
    if item.kind == "arithmetic":
        return grade_number(answer_text, item.answer or "")
    if item.kind == "fact":
        return grade_fact(answer_text, item.answers)
    raise ValueError(f"unknown kind {item.kind!r}")


def grade_many(items: Sequence[EvalItem], answers: Sequence[str], timeout_s: float = 5.0,
               workers: int = 2) -> list[bool]:
    """grade() for each (item, answer) pair, in order; code answers run `workers` at a time."""
    if len(items) != len(answers):
        raise ValueError(f"{len(items)} items but {len(answers)} answers")
    results: list[bool | None] = [None] * len(items)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {i: pool.submit(grade, item, answer, timeout_s)
                   for i, (item, answer) in enumerate(zip(items, answers)) if item.kind == "code"}
        for i, (item, answer) in enumerate(zip(items, answers)):
            if i not in futures:
                results[i] = grade(item, answer, timeout_s)
        for i, future in futures.items():
            results[i] = future.result()
    return [bool(r) for r in results]


# ---- arithmetic

_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?![\d,])|\d+)(?:\.\d+)?")


def extract_number(text: str) -> Decimal | None:
    """The last number in `text` (thousands commas and a Unicode minus understood), or None."""
    matches = _NUMBER.findall(text.replace("\u2212", "-"))
    return _decimal(matches[-1].replace(",", "")) if matches else None


def grade_number(answer_text: str, expected: str) -> bool:
    got, want = extract_number(answer_text), _decimal(expected)
    return got is not None and want is not None and got == want


def _decimal(text: str) -> Decimal | None:
    try:
        value = Decimal(text.strip())
    except (InvalidOperation, ValueError):
        return None
    return value if value.is_finite() else None


# ---- facts

def normalize_text(text: str) -> str:
    """Accents removed, case folded, each run of punctuation, symbols and whitespace one space."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return " ".join(re.sub(r"[\W_]+", " ", text.casefold()).split())


def grade_fact(answer_text: str, accepted: Sequence[str]) -> bool:
    said = f" {normalize_text(answer_text)} "
    return any(f" {want} " in said for want in map(normalize_text, accepted) if want)


# ---- code

_FENCED = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)```", re.DOTALL)
_OPENING = re.compile(r"```[^\n]*\n")


def extract_code(text: str) -> str:
    """The code of a reply: its first ```python block, else its first fenced block, else the text after
    an unclosed opening fence, else the whole text."""
    blocks = _FENCED.findall(text)
    for language, body in blocks:
        if language.lower() in ("python", "py", "python3"):
            return body
    if blocks:
        return blocks[0][1]
    opening = _OPENING.search(text)
    return text[opening.end():] if opening else text


@dataclass(frozen=True)
class CodeRun:
    passed: bool
    timed_out: bool
    returncode: int | None
    output: str                      # stdout and stderr together, truncated to MAX_OUTPUT_CHARS


# Runs in the sandbox subprocess: limits itself, installs the audit hook, then runs the answer and the
# tests from files in its directory. argv[1]: CPU seconds.
_RUNNER = r'''
import os, resource, sys

def _limit(name, value):
    kind = getattr(resource, name, None)
    if kind is None:
        return
    try:
        _, hard = resource.getrlimit(kind)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        pass

_limit("RLIMIT_CPU", int(sys.argv[1]))
_limit("RLIMIT_AS", 1 << 30)
_limit("RLIMIT_FSIZE", 1 << 20)
_limit("RLIMIT_CORE", 0)
_limit("RLIMIT_NOFILE", 64)
_limit("RLIMIT_NPROC", 0)

with open("solution.py", encoding="utf-8") as f:
    _solution = f.read()
with open("tests.py", encoding="utf-8") as f:
    _tests = f.read()

_ROOT = os.path.realpath(os.getcwd())
_WRITING = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_PATH_EVENTS = frozenset({
    "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link", "os.symlink",
    "os.truncate", "os.utime", "os.chflags", "os.lchflags", "os.setxattr", "os.removexattr",
    "shutil.rmtree", "shutil.copyfile", "shutil.copymode", "shutil.copystat", "shutil.move",
})
_DENIED = frozenset({
    "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty", "subprocess.Popen",
    "os.kill", "os.killpg", "signal.pthread_kill", "socket.__new__", "socket.connect", "socket.bind",
    "socket.getaddrinfo", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function", "ctypes.cdata",
    "ctypes.string_at", "ctypes.wstring_at", "os.chroot", "resource.setrlimit", "resource.prlimit",
})
_DENIED_MODULES = frozenset({"_posixsubprocess", "_socket"})

def _inside(path):
    if isinstance(path, int):
        return True
    try:
        real = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return real == _ROOT or real.startswith(_ROOT + os.sep) or real == os.devnull

def _audit(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
            (isinstance(flags, int) and flags & _WRITING)
        if writing and not _inside(path):
            raise PermissionError(f"sandbox: no writing outside the working directory: {path!r}")
    elif event in _PATH_EVENTS:
        for arg in args:
            if isinstance(arg, (str, bytes, os.PathLike)) and not _inside(arg):
                raise PermissionError(f"sandbox: {event} outside the working directory: {arg!r}")
    elif event == "import" and args[0] in _DENIED_MODULES:
        raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
    elif event in _DENIED or (event == "ctypes.dlopen" and args[0] is not None):
        raise PermissionError(f"sandbox: {event} is not allowed")  # dlopen(None): numpy imports ctypes

sys.addaudithook(_audit)
_namespace = {"__name__": "solution", "__builtins__": __builtins__}
try:
    exec(compile(_solution, "solution.py", "exec"), _namespace)
    exec(compile(_tests, "tests.py", "exec"), _namespace)
except SystemExit as e:
    print(f"sandbox: exited ({e.code!r}) before the tests finished", file=sys.stderr)
    sys.exit(3)
'''


def run_code(source: str, tests: str, timeout_s: float = 5.0) -> CodeRun:
    """Runs `source` followed by `tests` in the sandbox described in the module docstring."""
    with tempfile.TemporaryDirectory(prefix="kvserve-grade-", ignore_cleanup_errors=True) as tmp:
        workdir = Path(tmp)
        for name, text in (("solution.py", source), ("tests.py", tests), ("runner.py", _RUNNER)):
            (workdir / name).write_text(text, encoding="utf-8", errors="replace")
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": tmp, "TMPDIR": tmp,
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        command = [sys.executable, "-I", "-B", "runner.py", str(math.ceil(timeout_s) + 1)]
        output_path = workdir / "output.txt"
        with open(output_path, "wb") as output:
            try:
                process = subprocess.Popen(command, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=output,
                                           stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
            except OSError as e:
                return CodeRun(False, False, None, f"could not start the sandbox: {e}")
            finished = _wait_unreaped(process.pid, timeout_s)
            try:
                os.killpg(process.pid, signal.SIGKILL)   # the group's leader is not reaped yet, so its id is still ours
            except (ProcessLookupError, PermissionError):
                pass
            returncode = process.wait()
        with open(output_path, "rb") as f:
            raw = f.read(MAX_OUTPUT_CHARS * 4 + 1)
    text = raw.decode("utf-8", errors="replace")
    if len(text) > MAX_OUTPUT_CHARS or len(raw) > MAX_OUTPUT_CHARS * 4:
        text = text[:MAX_OUTPUT_CHARS] + "\n[... output truncated]"
    if not finished:
        return CodeRun(False, True, None, text)
    return CodeRun(returncode == 0, False, returncode, text)


def _wait_unreaped(pid: int, timeout_s: float) -> bool:
    """Waits up to `timeout_s` for the child to exit, leaving it unreaped (a zombie); True if it exited."""
    deadline = time.monotonic() + timeout_s
    pause = 0.002
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(pause, remaining))
        pause = min(pause * 2, 0.05)
