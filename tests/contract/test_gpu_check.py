"""`make gpu-check`'s script, dry-run on the CPU with tiny sizes: it must work before GPU minutes are spent."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.scenario  # make test-scenarios (CI runs it after make test)


def test_gpu_check_dry_run_passes_every_row(tmp_path):
    out = tmp_path / "table.json"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                            capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["check"].split(",")[0] for row in rows] == [
        "gpu-marked tests", "bf16 LoRA SFT → merged → reload + generate",
        "full fine-tuning", "QLoRA 4-bit nf4 train + merge",
        "DeepSpeed ZeRO-3 on one device", "padding-free packing", "throughput", "throughput"]
    # On the CPU the gpu-marked tests skip, and the row says so; every other row ran.
    assert rows[0]["status"] == "skipped" and " skipped" in rows[0]["result"] and " passed" not in rows[0]["result"]
    assert all(row["status"] == "ok" for row in rows[1:]), rows
    assert '"weights_dtype": "float32"' in rows[2]["result"]  # full fine-tuning's master copy (fp32 on the CPU too)
    assert '"distributed": "zero3"' in rows[4]["result"] and '"packing": true' in rows[5]["result"]
    assert "| check | status | seconds | result |" in result.stdout
