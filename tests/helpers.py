"""What the test modules share besides fixtures (those live in conftest.py):
parameter snapshots, the CLI in process and as a command, servers, ring
launches and model-directory edits. No test module imports another."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
from hypothesis import HealthCheck, settings
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import quantize_model
from typer.testing import CliRunner

import graphpatch
from graphpatch.cli import app
from graphpatch.testing import ring

TOKENS = mx.array([[5, 9, 33, 2, 17, 41, 8, 3, 12, 60]])
GRAPHPATCH = str(Path(sys.executable).parent / "graphpatch")
PYTHON = sys.executable
RANKS = Path(__file__).parent / "ranks"
PROPERTY = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # the same examples on every CI run
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
DELETE = object()  # edit_config: drop the key

# parameters


def snapshot(model) -> dict[str, np.ndarray]:
    """Every parameter as a numpy copy, keyed by path: a bit-for-bit record."""
    out = {}
    for k, v in tree_flatten(model.parameters()):
        v = v.view(mx.uint16) if v.dtype == mx.bfloat16 else v
        out[k] = np.array(v)
    return out


def assert_same_bits(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype, k
        assert np.array_equal(before[k], after[k]), k


def calls_of(layer, run) -> int:
    """How many times ``run()`` calls ``layer`` (its class's ``__call__``
    counted for this instance only)."""
    calls = []
    original = type(layer).__call__
    type(layer).__call__ = lambda self, *a, **k: (
        calls.append(self) or original(self, *a, **k)
    )
    try:
        run()
    finally:
        type(layer).__call__ = original
    return sum(c is layer for c in calls)


def assert_exact_and_redone(model, config, mode, dtype: str, tokens, name: str):
    """Cast to ``dtype`` and quantized as ``mode`` (kind, bits, group, or
    None), the model is rewritten by ``name`` at both layers, bit-exactly on
    ``tokens``; revert and a second apply give the same bits."""
    model.set_dtype(getattr(mx, dtype))
    if mode is not None:
        kind, bits, group = mode
        model, _ = quantize_model(model, config, group, bits, mode=kind)
    reference = model(tokens)
    report = graphpatch.apply(model, [name], probe=tokens)
    assert len(report.rewritten()) == 2, [s.reason for s in report.skipped()]
    out = model(tokens)
    assert out.dtype == reference.dtype and mx.array_equal(out, reference)
    before = snapshot(model)
    graphpatch.revert(model)
    graphpatch.apply(model, [name], verify=False)
    assert_same_bits(before, snapshot(model))


# the command line

runner = CliRunner()


def run(*args: str):
    """``graphpatch ARGS`` in this process (typer's runner)."""
    return runner.invoke(app, [str(a) for a in args])


def command(*args, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """``graphpatch ARGS`` as a process of its own."""
    return subprocess.run(
        [GRAPHPATCH, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def one_error_line(result, code: int = 2, after_report: bool = False) -> str:
    """The one ``error:`` line of a ``run`` result that exited ``code``."""
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()[-1 if after_report else 0 :]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    return lines[0]


def one_line(done: subprocess.CompletedProcess, code: int = 2) -> str:
    """The one ``error:`` line a ``command`` wrote to stderr, exiting ``code``."""
    assert done.returncode == code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    return lines[0]


# files


def digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (links as their target's text) and its hash."""
    found = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            found[name] = f"-> {os.readlink(path)}"
        elif path.is_file():
            found[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[name] = "dir"
    return found


def linked_copy(source: Path, into: Path) -> Path:
    """A model directory whose config.json is its own and whose other files
    are links to ``source``'s (so a test may rewrite config.json cheaply)."""
    into.mkdir(parents=True)
    for file in source.iterdir():
        if file.name == "config.json":
            shutil.copy(file, into / file.name)
        else:
            (into / file.name).symlink_to(file)
    return into


def edit_config(model: Path, **changes) -> None:
    config = json.loads((model / "config.json").read_text())
    for key, value in changes.items():
        if value is DELETE:
            config.pop(key, None)
        else:
            config[key] = value
    (model / "config.json").write_text(json.dumps(config))


def write_golden(path: Path, arrays: dict, metadata: dict) -> Path:
    mx.save_safetensors(str(path), arrays, metadata)
    return path


# servers and ranks


def free_port() -> int:
    return ring.free_ports(1)[0]


def post(port: int, route: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{route}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def wait_until_up(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1)
            return
        except OSError:
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)


@contextmanager
def server(model_dir: Path, *prefix: str, flags: tuple[str, ...] = ()):
    """``mlx_lm.server`` on ``model_dir`` (under ``prefix``, e.g. graphpatch
    run): (its port, its process) once it answers."""
    port = free_port()
    command = [*prefix, PYTHON, "-m", "mlx_lm", "server", "--model", str(model_dir)]
    process = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port), *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until_up(port, process)
        yield port, process
    finally:
        process.terminate()
        process.wait(timeout=30)


def answers(port: int) -> list[str]:
    greedy = {"max_tokens": 8, "temperature": 0}
    completion = post(port, "/v1/completions", {"prompt": "The quick", **greedy})
    messages = [{"role": "user", "content": "Hello world"}]
    chat = post(port, "/v1/chat/completions", {"messages": messages, **greedy})
    return [completion["choices"][0]["text"], chat["choices"][0]["message"]["content"]]


def graphpatch_serve(model_dir: Path, passes: str, *flags: str) -> tuple[list, str]:
    """Start ``graphpatch serve``, ask it, stop it: (its answers, its stderr)."""
    port = free_port()
    command = [GRAPHPATCH, "serve", str(model_dir), "--passes", passes]
    process = subprocess.Popen(
        [*command, "--port", str(port), *flags], stderr=subprocess.PIPE, text=True
    )
    return answered_and_stopped(process, port)


def answered_and_stopped(process: subprocess.Popen, port: int) -> tuple[list, str]:
    """Ask the server ``process`` once it is up, then stop it: (its answers,
    its stderr)."""
    try:
        wait_until_up(port, process)
        answered = answers(port)
    finally:
        process.terminate()
        stderr = process.communicate(timeout=30)[1]
    return answered, stderr


def launch(script: str, *args: str, n: int = 2) -> list[dict]:
    """Run ``tests/ranks/SCRIPT`` on ``n`` ranks of a ring group: each
    rank's last stdout line, as JSON."""
    results = ring.launch([sys.executable, str(RANKS / script), *args], n, timeout=120)
    for r in results:
        assert r.returncode == 0, f"rank {r.rank} ({r.returncode}):\n{r.stderr}"
    return [json.loads(r.stdout.strip().splitlines()[-1]) for r in results]


# adapters


def write_adapter(model_dir: Path, out: Path) -> Path:
    """An adapter directory as mlx-lm's lora writes it, its deltas non-zero."""
    model, _ = mlx_lm.load(str(model_dir))
    model.freeze()
    lora = {"rank": 4, "scale": 10.0, "dropout": 0.0}
    linear_to_lora_layers(model, 2, lora)
    trained = {}
    for i, (name, array) in enumerate(tree_flatten(model.trainable_parameters())):
        trained[name] = mx.random.normal(array.shape, key=mx.random.key(i)) * 0.05
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), trained)
    config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": lora}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out
