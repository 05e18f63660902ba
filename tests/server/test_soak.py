"""A 1-minute soak (`kvserve bench soak`) against a real server subprocess on the tiny model: mixed
traffic on every API with random client aborts, disconnects, cancels and bad requests (a few
thousand requests; it ran 2 minutes until the suite needed its time back). The 30-minute run is in
docs/reliability.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import REPO_ROOT


def test_a_minute_of_mixed_traffic_leaks_nothing_and_loses_nothing():
    out = subprocess.run([sys.executable, "-m", "kvserve.cli", "bench", "soak", "--minutes", "1", "--json-only",
                          "--model", "random:tiny", "--kvserve-args", "--dtype float32 --num-kv-blocks 256",
                          "--seed", "1"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})   # the tiny model gains nothing from two
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 0 and result["passed"], json.dumps(result, indent=1)
    assert all(result["checks"].values())
    assert result["requests"] > 500 and set(result["by_kind"]) == {"openai-stream", "openai-whole", "anthropic",
                                                                    "bedrock", "websocket", "bad"}
    assert result["client_aborts"] > 20            # the aborts and disconnects did happen ...
    assert result["server_errors"] == result["lost"] == 0
    assert result["server_admitted"] == result["server_finished"] > 0
    assert result["state"]["bench"]["blocks_used"] == 0 and result["state"]["bench"]["integrity"] == "ok"
