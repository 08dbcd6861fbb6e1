"""The benchmark suite keeps working: its smoke size runs every row end to end (no timing is asserted in CI)."""

import json
import math
import subprocess
import sys
from pathlib import Path


REPOSITORY = Path(__file__).resolve().parents[1]


def test_smoke_run_prints_and_writes_every_row(tmp_path):
    output = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--size", "smoke", "--json", str(output)],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(output.read_text())["rows"]
    numbers = {row["name"].split()[0] for row in rows}
    assert numbers == {str(n) for n in range(1, 11)}
    for row in rows:
        assert row["name"] in result.stdout
        if not row["name"].startswith("9 "):
            assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
    economy = {row["name"]: row["details"] for row in rows if row["name"].startswith("5 ")}
    assert economy["5 token economy 512²"] == {
        "emma_t2i": 256,
        "bagel_t2i": 1024,
        "emma_edit": 512,
        "bagel_edit": 3344,
    }
