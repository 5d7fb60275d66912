"""What a verification record is keyed by (``key``): the checkpoint, any
adapter, the software and the passes, each as cheaply as holds. A record
matches only an apply that saw the same.
"""

import hashlib
import json
import os
import stat
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm

from graphpatch._version import __version__
from graphpatch.contract import Pass
from graphpatch.plan import resolve

SAMPLES = 8  # blocks of each weight file hashed, spread over its data
BLOCK = 4096
HEADER_LIMIT = 100 << 20  # a larger safetensors header is no header


def key(
    model_dir: Path,
    passes: str | list[str] | None,
    model: nn.Module | None = None,
    adapter_path: str | Path | None = None,
) -> str:
    """What a record must match: checkpoint, adapter, software and passes.

    Args:
        model_dir: the checkpoint's directory.
        passes: pass specs, as ``apply`` takes them.
        model: the loaded model, whose LoRA layers (if any) are keyed too.
        adapter_path: the adapter directory mlx-lm loaded, when known.

    Raises:
        OSError: config.json or a source file cannot be read.
    """
    plan, _ = resolve(passes)
    parts = {
        "config": _sha256((model_dir / "config.json").read_bytes()),
        "weights": [_fingerprint(f) for f in sorted(model_dir.glob("*.safetensors"))],
        "versions": [__version__, mx.__version__, mlx_lm.__version__],
        "passes": [f"{p.name}{sorted(o.items())}" for p, o in plan],
        "code": _code([p for p, _ in plan]),
        "adapter": _adapter(model, adapter_path),
        "ranks": mx.distributed.init().size(),  # a 4-rank split is not a 2-rank one
    }
    return _sha256(json.dumps(parts).encode())[:32]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fingerprint(file: Path) -> list:
    """A weight file as the key sees it. Inode and ctime change with any
    write, even one that keeps size and mtime (``touch -r``); the header and
    sampled blocks pin the content where a filesystem's ctime does not. A
    file that cannot be read (a dangling link, a FIFO) is keyed as such:
    mlx-lm may never open it."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block
    except OSError as e:
        return [file.name, f"unreadable: {e.strerror}"]
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return [file.name, "not a regular file"]
        times = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
        return [file.name, *times, _content(fd, st.st_size)]
    except OSError as e:
        return [file.name, f"unreadable: {e.strerror}"]
    finally:
        os.close(fd)


def _content(fd: int, size: int) -> str:
    """A hash of the safetensors header and of SAMPLES blocks of the data."""
    digest = hashlib.sha256()
    length = int.from_bytes(os.pread(fd, 8, 0).ljust(8, b"\0"), "little")
    start = 8 + length if length <= min(HEADER_LIMIT, size - 8) else 0
    digest.update(os.pread(fd, start, 0))
    step = max((size - start) // SAMPLES, 1)
    for offset in range(start, size, step):
        digest.update(os.pread(fd, BLOCK, offset))
    return digest.hexdigest()


def _code(plan: list[Pass]) -> str:
    """A hash of the source graphpatch runs: its core and each applied pass
    (a whole package, for a pass that is one), so that a pass edited in a
    development install is verified again."""
    core = Path(str(sys.modules["graphpatch"].__file__)).parent  # not imported: a cycle
    # the core, and the passes' shared modules (heads.py) beside each pass
    files = sorted(core.glob("*.py")) + sorted((core / "passes").glob("*.py"))
    digest = hashlib.sha256()
    for p in plan:
        if (found := _pass_files(p)) is None:
            digest.update(os.urandom(16))  # source unseen: never trusted again
        files += found or []
    for file in files:
        digest.update(f"{file.name}\0".encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _pass_files(p: Pass) -> list[Path] | None:
    """The pass's module, or its whole package. None for a user's pass: its
    hooks, markers and helpers may live in any file (one edited behind a
    record would be trusted), so it is verified at every start."""
    name = p.find.__module__
    if not name.startswith("graphpatch.passes."):
        return None
    module = sys.modules[".".join(name.split(".")[:3])]  # its module or package
    file = Path(str(module.__file__))
    return sorted(file.parent.rglob("*.py")) if hasattr(module, "__path__") else [file]


def _adapter(model: nn.Module | None, adapter_path: str | Path | None) -> list:
    """The adapter files mlx-lm loaded (a full fine-tune leaves no layer to
    find), and the arrays of every LoRA or DoRA layer in the model: mlx-lm
    marks an adapter-loaded model in no other way."""
    files = []
    if adapter_path is not None:
        directory = Path(adapter_path)
        names = ("adapter_config.json", "adapters.safetensors")
        files = [_fingerprint(directory / name) for name in names]
    layers = []
    for path, module in [] if model is None else model.named_modules():
        arrays = [module.get(n) for n in ("lora_a", "lora_b", "m")]
        if isinstance(arrays[0], mx.array) and isinstance(arrays[1], mx.array):
            found = [a for a in arrays if isinstance(a, mx.array)]
            mx.eval(found)
            content = b"".join(bytes(memoryview(a)) for a in found)
            layers.append([path, str(getattr(module, "scale", None)), _sha256(content)])
    return [files, layers]
