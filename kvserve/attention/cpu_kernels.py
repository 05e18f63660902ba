"""Builds and loads kvserve's C++ CPU kernels (csrc/) with torch's extension builder, once per
machine kind: the build is cached under ~/.cache/kvserve/torch_extensions/torch<version>-<cpu>, keyed by
the CPU's feature flags because it is compiled for the CPU it runs on (-march=native). Without a compiler
the build fails; `load()` then returns None and callers keep the torch reference path.

The first build takes 1.5-3 minutes. It must survive being interrupted (Ctrl-C, a CI time-out, SIGKILL)
and concurrent kvserve processes, so a build directory holds, for a module `name`:

    <name>.lock               flock'ed by the one process building `name`; records its pid for waiters
    <name>-<digest>/          a finished build, published by renaming its whole build directory there;
                              its one .so is the module
    .<name>.build-<pid>-*/    a build in progress (or the remains of an interrupted one)

<digest> hashes everything the binary depends on besides the directory's key (sources, flags, Python,
compiler), so a published build is complete and up to date by construction: loading it takes no lock
and runs no compiler. Everything else happens under the lock. The OS releases a flock when its holder
dies, so the lock itself can't go stale; what a dead holder leaves is its pid in the lock file and its
build directory, which the next holder clears (logging one line). The same goes for the `lock` file of torch's
own builder, which an interrupted build of older kvserve versions left in the directory.

Environment:
    KVSERVE_EXTENSIONS_DIR           root of the cache (default ~/.cache/kvserve/torch_extensions).
    KVSERVE_KERNEL_BUILD_TIMEOUT_S   how long a process waits for another one's build of the kernels
                                     before giving up on them and using the torch path (default 600).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import importlib.util
import itertools
import logging
import os
import platform
import shutil
import socket
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

NAME = "kvserve_cpu_kernels"
HEADERS = list((Path(__file__).parent / "csrc").glob("*.h"))
SOURCES = [Path(__file__).parent / "csrc" / name for name in ("bindings.cpp", "paged_decode.cpp", "fused_ops.cpp",
                                                                  "int8_matmul.cpp", "int4_matmul.cpp", "int4_gemm.cpp",
                                                                  "int8_gemm.cpp", "prefill_attention.cpp", "decode_layers.cpp")]
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math"]
# Added for the level in use. An AVX2-level process (a Zen 3, or KVSERVE_CPU_ISA=avx2 on an AVX-512
# machine) gets a build without AVX-512, as an AVX2 CPU's own build is: 16 vector registers and VEX
# encodings. The AVX-512 build's AVX2 paths may use AVX512VL's 32 registers, which flattered the
# register-hungry GEMM tiles by 20-40% under the cap (docs/speed-notes.md).
LEVEL_CFLAGS = {"avx2": ["-mno-avx512f"]}
LDFLAGS = ["-fopenmp", "-lmvec"]

TIMEOUT_ENV = "KVSERVE_KERNEL_BUILD_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0
_KEEP_BUILDS = 3        # published builds kept per module: a few checkouts sharing the cache don't rebuild in turn
_POLL_S = 0.25


class KernelBuildTimeout(TimeoutError):
    """Another process held the build lock for longer than the build timeout."""


def _cpu_key() -> str:
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:12]


def build_directory() -> Path:
    root = Path(os.environ.get("KVSERVE_EXTENSIONS_DIR", Path.home() / ".cache" / "kvserve" / "torch_extensions"))
    import torch

    path = root / f"torch{torch.__version__}-{_cpu_key()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    return float(value) if value else DEFAULT_TIMEOUT_S


@cache
def load() -> ModuleType | None:
    """The compiled module (`paged_decode`, `decode_step`, `decode_qkv`; the fused bf16 ops `rms_norm`,
    `silu_mul`, `rotary`; `int8_matmul`, `int4_matmul`), or None when it cannot be built here."""
    try:
        # Builds are keyed by sources and flags (the digest, ninja's commands), not headers: their hash is a flag.
        from kvserve.cpu_features import LEVELS, isa

        level = isa()                           # the CPU's best, or the one KVSERVE_CPU_ISA asks for
        headers = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(HEADERS))).hexdigest()[:12]
        module = build(NAME, SOURCES, build_directory(),
                       extra_cflags=[*CFLAGS, *LEVEL_CFLAGS.get(level, ()), f"-DKVSERVE_HEADERS={headers}"],
                       extra_ldflags=LDFLAGS)
        module.set_isa(LEVELS.index(level))
        return module
    except Exception as error:   # no compiler, no headers, unsupported platform, build timeout: keep the reference path
        log.warning("CPU attention kernel unavailable (%s); using the torch reference attention", error)
        return None


def build(name: str, sources: Sequence[Path], directory: Path, *, extra_cflags: Sequence[str] = (),
          extra_ldflags: Sequence[str] = (), timeout_s: float | None = None) -> ModuleType:
    """The extension `name` built from `sources` in `directory`: the published build when there is one,
    else built under the lock (waiting at most `timeout_s`, default $KVSERVE_KERNEL_BUILD_TIMEOUT_S, for
    another process's build) and published. Raises on a failed build and KernelBuildTimeout on a wait."""
    import torch  # noqa: F401  (the module links against torch's libraries, which must be loaded first)

    digest = _digest(name, sources, extra_cflags, extra_ldflags)
    if (published := _published(directory, name, digest)) is not None:
        return _import(published)
    directory.mkdir(parents=True, exist_ok=True)
    with build_lock(directory, name, build_timeout_s() if timeout_s is None else timeout_s) as dead_holder:
        _clear_leftovers(directory, name, dead_holder)
        if (published := _published(directory, name, digest)) is not None:    # built while we waited
            return _import(published)
        return _build_and_publish(name, sources, directory, digest, extra_cflags, extra_ldflags)


@contextmanager
def build_lock(directory: Path, name: str, timeout_s: float) -> Iterator[str]:
    """Holds the exclusive build lock of `name` in `directory`, waiting at most `timeout_s` for it; yields
    the record of a holder that died holding it ("" when the last holder released it).

    The lock file is never removed, since a waiter could then lock the old inode while a newcomer locks
    a new file. It is empty except while held, or after its holder died holding it."""
    path = directory / f"{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)    # not inherited by the compiler: PEP 446
    try:
        _acquire(fd, path, timeout_s)
        dead_holder = _read_record(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, _own_record().encode(), 0)
        try:
            yield dead_holder
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)                                       # releases the flock


def _acquire(fd: int, path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for attempt in itertools.count():
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        holder = _describe(_read_record(fd))
        if attempt == 1:            # not at once: a holder records itself just after locking, and may be done soon
            log.warning("Waiting for %s, which holds %s: it is building kvserve's C++ CPU kernels in %s, a one-time "
                        "build of about 2-3 minutes; giving up after %g s (%s)", holder, path, path.parent,
                        timeout_s, TIMEOUT_ENV)
        if time.monotonic() >= deadline:
            raise KernelBuildTimeout(f"gave up after {timeout_s:g} s waiting for {holder} to finish building the "
                                     f"kernels in {path.parent} (it holds {path}); set {TIMEOUT_ENV} to wait longer")
        time.sleep(_POLL_S)


def _own_record() -> str:
    """Who holds the lock, for waiters' messages: pid, host and the process's start time (the pid alone
    could be recycled; the flock, not this record, decides who holds the lock)."""
    return f"{os.getpid()} {socket.gethostname()} {_start_time(os.getpid())}\n"


def _start_time(pid: int) -> str:
    try:   # field 22 of /proc/<pid>/stat, counted after the parenthesised command name (which may hold spaces)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def _read_record(fd: int) -> str:
    return os.pread(fd, 512, 0).decode(errors="replace").strip()


def _describe(record: str) -> str:
    pid, host = (record.split() + ["?", "?"])[:2]
    return f"pid {pid} on {host}" if record else "another process"


def _clear_leftovers(directory: Path, name: str, dead_holder: str) -> None:
    """Clears what interrupted builds left; called under the lock, so no build of `name` is running."""
    if dead_holder:
        log.warning("Cleared a stale kvserve kernel build lock in %s: its holder, %s, died while building",
                    directory, _describe(dead_holder))
    for stale in directory.glob(f".{name}.build-*"):     # a build directory lives only while its owner holds the lock
        shutil.rmtree(stale, ignore_errors=True)
    torch_lock = directory / "lock"                        # torch's FileBaton, spun on forever by older versions
    if torch_lock.exists():
        torch_lock.unlink(missing_ok=True)
        log.warning("Removed a stale torch extension build lock %s left by an interrupted build", torch_lock)


def _digest(name: str, sources: Sequence[Path], cflags: Sequence[str], ldflags: Sequence[str]) -> str:
    import torch

    digest = hashlib.sha256()
    for part in (name, torch.__version__, sys.version, sysconfig.get_config_var("EXT_SUFFIX") or "",
                 os.environ.get("CXX", ""), *cflags, "--", *ldflags):
        digest.update(part.encode() + b"\0")
    for source in sources:
        digest.update(Path(source).name.encode() + b"\0" + Path(source).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _published(directory: Path, name: str, digest: str) -> Path | None:
    """The module of a published build (renamed into place whole, so present means complete)."""
    return next((directory / f"{name}-{digest}").glob("*.so"), None)


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the extension {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build_and_publish(name: str, sources: Sequence[Path], directory: Path, digest: str,
                       cflags: Sequence[str], ldflags: Sequence[str]) -> ModuleType:
    from torch.utils.cpp_extension import load as torch_build

    # A fresh path per attempt: torch skips building for a (name, sources, flags, directory) it built in this process.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.build-{os.getpid()}-", dir=directory))
    staging.chmod(0o755)                                   # mkdtemp's 0o700 would hide the build from other users
    try:
        _seed(staging, directory, name)
        log.info("Building kvserve's C++ CPU kernels %s in %s (one-time, about 2-3 minutes)", name, staging)
        module = torch_build(name=name, sources=[str(source) for source in sources], build_directory=str(staging),
                             extra_cflags=list(cflags), extra_ldflags=list(ldflags), verbose=False)
        built = Path(str(module.__file__))
        if built.parent != staging or len(list(staging.glob("*.so"))) != 1:
            raise RuntimeError(f"torch built {built}, expected the one .so in {staging}")
        with open(built, "rb") as library:
            os.fsync(library.fileno())                     # a crash right after the rename can't publish an empty file
        final = directory / f"{name}-{digest}"
        shutil.rmtree(final, ignore_errors=True)           # a directory without its .so (see _published)
        os.rename(staging, final)                          # the publication: atomic, so readers see all or nothing
        os.utime(final)
        _prune(directory, name)
        return module
    finally:
        shutil.rmtree(staging, ignore_errors=True)        # gone already when published


def _seed(staging: Path, directory: Path, name: str) -> None:
    """Copies the objects and ninja's records of the latest published build, so that ninja recompiles only
    what changed (it compares commands and mtimes, which copy2 keeps); never a .so, the build's output."""
    if builds := _builds(directory, name):
        for path in builds[-1].iterdir():
            if path.is_file() and path.suffix != ".so" and path.name != "lock":
                shutil.copy2(path, staging / path.name)


def _prune(directory: Path, name: str) -> None:
    for old in _builds(directory, name)[:-_KEEP_BUILDS]:   # processes that loaded one keep it mapped
        shutil.rmtree(old, ignore_errors=True)


def _builds(directory: Path, name: str) -> list[Path]:
    """The published builds of `name`, oldest first."""
    return sorted((path for path in directory.glob(f"{name}-*") if path.is_dir()), key=lambda p: p.stat().st_mtime)
