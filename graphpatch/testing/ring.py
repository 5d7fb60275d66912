"""Run n ranks of an MLX ring group on localhost, as ``mlx.launch`` does.

``mlx.launch --backend ring`` writes a hostfile (one list of ``ip:port`` per
rank) and starts each rank with ``MLX_RANK`` and ``MLX_HOSTFILE`` set. Its
launcher spins a core while it relays output; on a small machine that core is
one the ranks need. ``launch`` starts the ranks itself with the same hostfile
and environment, on loopback only, and kills every rank at the deadline, so
no rank can hang a test or a benchmark. Once a rank fails, the others get a
few seconds to fail too before they are killed: they would only wait for it.
"""

import json
import os
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RankResult:
    rank: int
    returncode: int | None  # None: killed at the deadline
    stdout: str
    stderr: str


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


FAILED_RANK_GRACE = 5.0  # seconds


def _wait(ranks: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [process.poll() for process in ranks]
        if None not in codes:
            return
        if any(code not in (None, 0) for code in codes):
            deadline = min(deadline, time.monotonic() + FAILED_RANK_GRACE)
        time.sleep(0.05)


def launch(
    command: list[str], n: int = 2, timeout: float = 120, env: dict | None = None
) -> list[RankResult]:
    """Start ``command`` as ranks 0..n-1 of a ring group and wait for all.

    Args:
        command: the program each rank runs (e.g. ``[python, script.py]``).
        n: the number of ranks.
        timeout: seconds until every rank still running is killed (a few
            seconds after one rank fails).
        env: variables to add to each rank's environment.

    Returns:
        One result per rank, in rank order.
    """
    with tempfile.TemporaryDirectory(prefix="graphpatch-ring-") as tmp:
        hostfile = Path(tmp) / "hostfile.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(n)]))
        outputs = [(Path(tmp) / f"{r}.out", Path(tmp) / f"{r}.err") for r in range(n)]
        ranks = []
        for rank, (out, err) in enumerate(outputs):
            rank_env = {**os.environ, **(env or {})}
            rank_env |= {"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}
            with open(out, "w") as stdout, open(err, "w") as stderr:
                ranks.append(
                    subprocess.Popen(
                        command, env=rank_env, stdout=stdout, stderr=stderr
                    )
                )
        _wait(ranks, timeout)
        codes = [process.poll() for process in ranks]
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.wait()
        return [
            RankResult(rank, code, out.read_text(), err.read_text())
            for rank, (code, (out, err)) in enumerate(zip(codes, outputs, strict=True))
        ]
