"""`python -m bench --smoke` runs every figure end to end and writes a complete results file.

Only completeness is checked: figures come from `make bench`, never from timed assertions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {"name", "value", "unit", "baseline", "baseline_value", "ratio", "target", "met", "params"}


@pytest.mark.timeout(600)
def test_smoke_run_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=590,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads(out.read_text())

    assert document["mode"] == "smoke"
    machine = document["machine"]
    for key in ("cpu_model", "cores", "python", "temporalio", "date"):
        assert machine[key], key

    results = document["results"]
    for figure in ("1.", "2.", "3.", "4.", "5.", "6.", "7.", "8.", "9.", "10.", "11.", "12.", "13."):
        assert any(r["name"].startswith(figure) for r in results), f"figure {figure} is missing"
    for result in results:
        assert result.keys() >= FIELDS, result["name"]
        if result["value"] is None:
            assert str(result.get("not_measured", "")).startswith("not measured: "), result["name"]
        else:
            assert result["unit"], result["name"]
            if result["baseline_value"]:
                assert result["ratio"] is not None, result["name"]

    assert "| figure" in done.stdout  # the table is printed
