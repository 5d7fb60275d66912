"""benchmarks/device.sh, the prepared device run, on the CPU: ``--quick``
runs every step of it at tiny sizes and prints the one table."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "device.sh"
STEPS = ("fuse_glu", "fuse_qkv", "last_token", "checkpoint")


def test_quick_runs_every_step_and_prints_one_table(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "XDG_CACHE_HOME": str(tmp_path)}
    done = subprocess.run(
        ["bash", str(SCRIPT), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("graphpatch device run, ") and "--quick" in lines[0]
    start = lines.index("| benchmark | what it printed |")
    table = lines[start : lines.index("", start)]  # one table, whole
    assert table[1] == "|---|---|"
    assert all(line.startswith("| ") and line.endswith(" |") for line in table[2:])
    rows = [line.split(" | ")[0].removeprefix("| ") for line in table[2:]]
    assert sorted(set(rows)) == sorted(STEPS)
    assert "failed" not in done.stdout and lines[-1].startswith("took ")
    assert any("same tokens from every variant" in line for line in table)


def test_bad_arguments_are_one_line():
    done = subprocess.run(
        ["bash", str(SCRIPT), "--fast"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
