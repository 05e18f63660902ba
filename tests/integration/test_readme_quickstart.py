"""The README quickstart is copy-paste correct: `kvserve serve` (what `make serve` runs) on the
embedded default model, then the README's curl command streams, then its openai snippet runs."""

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    makefile = (README.parent / "Makefile").read_text()
    assert "$(VENV)/bin/kvserve serve\n" in makefile, "make serve must run plain `kvserve serve`"
    port = free_port()
    kvserve = Path(sys.executable).parent / "kvserve"
    # The default --state-dir (batch jobs) lives under XDG_STATE_HOME: a fresh one per run.
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path_factory.mktemp("state"))}
    proc = subprocess.Popen([str(kvserve), "serve", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("kvserve serve did not become healthy")
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def on_port(snippet: str, port: int) -> str:
    assert "127.0.0.1:8000" in snippet
    return snippet.replace("127.0.0.1:8000", f"127.0.0.1:{port}")


def test_curl_streams(server):
    [curl] = [b for b in code_blocks("bash") if b.lstrip().startswith("curl -N")]
    out = subprocess.run(["bash", "-c", on_port(curl, server)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    events = [line for line in out.stdout.splitlines() if line.startswith("data: ")]
    assert len(events) >= 5 and events[-1] == "data: [DONE]"
    assert '"content":"' in out.stdout


def test_openai_snippet_runs(server):
    [snippet] = [b for b in code_blocks("python") if "from openai import OpenAI" in b and "batches" not in b
                 and 'model="chat"' not in b]
    out = subprocess.run([sys.executable, "-c", on_port(snippet, server)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert re.search(r"\[\d+ tokens, \d+ cached\]", out.stdout)


def test_batch_snippet_runs(server):
    [snippet] = [b for b in code_blocks("python") if "client.batches.create" in b]
    out = subprocess.run([sys.executable, "-c", on_port(snippet, server)], capture_output=True, text=True,
                         timeout=180, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, out.stderr
    answers = out.stdout.strip().splitlines()
    assert [a.split()[0] for a in answers] == ["doc-0", "doc-1"] and all(len(a.split()) > 2 for a in answers)
