"""The short soak (bench/soak.py): 20 s of 32 clients of mixed traffic against the suite's shared real
server, with no 5xx, no wrong answer and no leak of memory, files or threads."""

import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.scenario  # make test-scenarios (CI runs it after make test)


def test_a_short_soak_serves_mixed_traffic_without_errors_or_leaks(server):
    # Every /ping must still be answered within the pinger's 36 s (three times the p99 limit given); the p99
    # target (100 ms) is make soak's. Here 32 clients and vLLM share 2 cores: at load 15 the short run's p99
    # reached 3.9 s; in one scenario run 6.4 s over 22 pings; run alone, 3.6 s with stop 34's server and 2.4 s
    # with stop 35's: the machine, not the server.
    command = [sys.executable, str(REPO / "bench" / "soak.py"), "--seconds", "20", "--ping-p99-ms", "12000",
               "--url", server.url, "--pid", str(server.process.pid)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    summary = [line for line in result.stdout.splitlines() if line.startswith(("soak:", "  "))]
    assert result.returncode == 0, "\n".join(summary) or result.stdout[-3000:] + result.stderr[-3000:]
    assert " 0 wrong" in summary[0]
    assert server.invoke({"inputs": "still there?", "parameters": {"max_new_tokens": 2}}).status_code == 200
