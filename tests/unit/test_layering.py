"""The control plane (kv/, sched/, routing/, batch/) imports no torch: its modules load, and its
tests run, without it."""

import pkgutil
import subprocess
import sys

import kvserve

CONTROL_PLANE = ("kv", "sched", "routing", "batch")


def test_the_control_plane_imports_no_torch():
    modules = [f"kvserve.{package}.{info.name}" for package in CONTROL_PLANE
               for info in pkgutil.iter_modules([f"{kvserve.__path__[0]}/{package}"])]
    assert len(modules) > 10
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + \
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"torch is imported by the control plane: {result.stdout[:300]}"
