"""Building the C++ CPU kernels survives interrupted and concurrent builds (kvserve/attention/cpu_kernels.py):
a build killed midway, a build lock held by a live process, torch's own leftover lock, two builders at once.
Every build runs in a subprocess, bounded by a timeout, on a stand-in extension in a temporary directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Plain CPython: builds in a second or two.
QUICK_SOURCE = """
#include <Python.h>
#define KV_CAT_(a, b) a##b
#define KV_CAT(a, b) KV_CAT_(a, b)
#define KV_STR_(a) #a
#define KV_STR(a) KV_STR_(a)
static PyObject* answer(PyObject*, PyObject*) { return PyLong_FromLong(42); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, nullptr}, {nullptr, nullptr, 0, nullptr}};
static PyModuleDef module = {PyModuleDef_HEAD_INIT, KV_STR(TORCH_EXTENSION_NAME), nullptr, -1, methods};
PyMODINIT_FUNC KV_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&module); }
"""

# The same, plus ~4 s of compile-time evaluation (under GCC's default constexpr limits): time enough to
# kill the compiler midway, or for a second builder to find the lock held.
SLOW_SOURCE = QUICK_SOURCE + """
constexpr long spin(long outer, long inner) {
    long s = 0;
    for (long i = 0; i < outer; ++i)
        for (long j = 0; j < inner; ++j) s += (i ^ j) & 7;
    return s;
}
static_assert(spin(7, 200000) > 0, "compile-time work");
"""

# argv: module name, source, build directory. Prints the module's answer (42).
BUILD = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
from kvserve.attention import cpu_kernels
print(cpu_kernels.build(sys.argv[1], [Path(sys.argv[2])], Path(sys.argv[3])).answer(), flush=True)
"""

COMPILERS = {"cc1plus", "clang", "clang++"}


def _env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KVSERVE_EXTENSIONS_DIR", "KVSERVE_KERNEL_BUILD_TIMEOUT_S")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env | overrides


def _start(script: str, *args: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """A python child in its own session, so that killing its process group kills its compilers too."""
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=env or _env(), cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def _finish(process: subprocess.Popen[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_session(process.pid)
        stdout, stderr = process.communicate()
        pytest.fail(f"the child did not finish within {timeout_s} s (hung?); stderr:\n{stderr}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _build(name: str, source: Path, directory: Path, timeout_s: float) -> subprocess.CompletedProcess[str]:
    return _finish(_start(BUILD, name, source, directory), timeout_s)


def _source(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.cpp"
    path.write_text(text)
    return path


def _session(session: int) -> dict[int, str]:
    """The live (not zombie) processes of `session`: pid -> command."""
    processes = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        command, fields = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        if fields[0] != "Z" and fields[3] == str(session):             # fields: state ppid pgrp session ...
            processes[int(stat.parent.name)] = command
    return processes


def _compiling(session: int) -> bool:
    """Whether a compiler proper (not just its driver) runs in `session`."""
    return bool(COMPILERS & set(_session(session).values()))


def _kill_session(session: int) -> None:
    """SIGKILLs every process of `session`, as a CI time-out does: killing the process group is not enough,
    since ninja runs each compiler in a process group of its own."""
    deadline = time.monotonic() + 10
    while processes := _session(session):
        for pid in processes:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert time.monotonic() < deadline, f"processes outlived SIGKILL: {processes}"
        time.sleep(0.1)


def _published(directory: Path, name: str) -> list[Path]:
    return [path for path in directory.glob(f"{name}-*") if path.is_dir()]


def test_a_build_killed_midway_does_not_block_the_next_one(tmp_path):
    source, directory = _source(tmp_path, "slow", SLOW_SOURCE), tmp_path / "extensions"
    victim = _start(BUILD, "slow", source, directory)
    try:
        deadline = time.monotonic() + 120
        while not _compiling(victim.pid):
            assert victim.poll() is None, f"the build ended before it could be killed: {victim.communicate()}"
            assert time.monotonic() < deadline, "no compiler started within 120 s"
            time.sleep(0.1)
        time.sleep(1)
    finally:
        _kill_session(victim.pid)                               # SIGKILL: no handler, no finally clause runs
        victim.communicate()
    assert list(directory.glob(".slow.build-*")) and not _published(directory, "slow"), "killed after the build ended"
    assert (directory / "slow.lock").read_text().split()[0] == str(victim.pid)

    result = _build("slow", source, directory, timeout_s=240)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["42"]
    stale = [line for line in result.stderr.splitlines() if "stale" in line]
    assert len(stale) == 1 and f"pid {victim.pid}" in stale[0], result.stderr
    assert not list(directory.glob(".slow.build-*"))            # the killed build's directory is gone
    assert len(_published(directory, "slow")) == 1


def test_a_wait_for_a_live_build_says_what_it_waits_for_and_gives_up(tmp_path):
    env = _env(KVSERVE_EXTENSIONS_DIR=str(tmp_path), KVSERVE_KERNEL_BUILD_TIMEOUT_S="2")
    holder = _start("import time\nfrom kvserve.attention import cpu_kernels\n"
                    "with cpu_kernels.build_lock(cpu_kernels.build_directory(), cpu_kernels.NAME, timeout_s=5):\n"
                    "    print('locked', flush=True)\n    time.sleep(120)\n", env=env)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked", holder.communicate()
        started = time.monotonic()
        waiter = _finish(_start("from kvserve.attention import cpu_kernels\nprint(cpu_kernels.load())", env=env), 60)
        waited = time.monotonic() - started
    finally:
        _kill_session(holder.pid)
        holder.communicate()
    assert waiter.returncode == 0, waiter.stderr
    assert waiter.stdout.split() == ["None"]                    # load() falls back to the torch path
    assert 2 <= waited < 30
    lines = waiter.stderr.splitlines()
    waiting = [line for line in lines if "Waiting for" in line]
    assert len(waiting) == 1, waiter.stderr                     # said once, not per poll
    assert f"pid {holder.pid}" in waiting[0] and str(tmp_path) in waiting[0] and "2-3 minutes" in waiting[0]
    unavailable = [line for line in lines if "unavailable" in line]
    assert len(unavailable) == 1, waiter.stderr
    assert "gave up after 2 s" in unavailable[0] and "KVSERVE_KERNEL_BUILD_TIMEOUT_S" in unavailable[0]
    assert len(lines) == 2, waiter.stderr


def test_a_torch_lock_left_by_an_interrupted_build_is_cleared(tmp_path):
    source, directory = _source(tmp_path, "quick", QUICK_SOURCE), tmp_path / "extensions"
    directory.mkdir()
    (directory / "lock").touch()                                # torch's FileBaton would spin on it forever
    result = _build("quick", source, directory, timeout_s=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["42"]
    assert not (directory / "lock").exists()
    assert "stale torch extension build lock" in result.stderr


def test_concurrent_builders_share_one_build(tmp_path):
    source, directory = _source(tmp_path, "slow", SLOW_SOURCE), tmp_path / "extensions"
    builders = [_start(BUILD, "slow", source, directory) for _ in range(2)]
    results = [_finish(builder, timeout_s=300) for builder in builders]
    for result in results:
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["42"]
    assert sum(result.stderr.count("Building kvserve's") for result in results) == 1
    assert len(_published(directory, "slow")) == 1

    again = _build("slow", source, directory, timeout_s=60)    # the published build: no lock, no compiler
    assert again.returncode == 0 and again.stdout.split() == ["42"], again.stderr
    assert "Building" not in again.stderr and "Waiting" not in again.stderr


@pytest.mark.parametrize("level", ["portable", "avx2"])
def test_the_kernels_take_the_level_kvserve_cpu_isa_asks_for(level):
    """A process started with KVSERVE_CPU_ISA runs that path (when the CPU has it)."""
    import os
    import subprocess
    import sys

    from kvserve.cpu_features import LEVELS, available_levels

    if level not in available_levels():
        pytest.skip(f"this CPU has no {level} path")
    code = ("from kvserve.attention import cpu_kernels; k = cpu_kernels.load(); "
            "print(k.get_isa(), k.built_with_avx512())")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "KVSERVE_CPU_ISA": level},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and len(out.stdout.split()) == 2, out.stderr[-2000:]
    got_level, avx512_code = out.stdout.split()
    assert got_level == str(LEVELS.index(level)), out.stderr[-2000:]
    if level == "avx2":        # an AVX2 CPU's own build: no AVX-512 code, 16 vector registers
        assert avx512_code == "False"
