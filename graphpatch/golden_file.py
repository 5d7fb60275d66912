"""A golden file as ``golden`` writes it, read back and checked for what
``check`` reads: its prompts, logits, top ids and metadata; and the hashes
of a model's weights it records.
"""

import contextlib
import hashlib
import json
from pathlib import Path

import mlx.core as mx

from graphpatch.checks import LoadError, check_safetensors, regular_file
from graphpatch.contract import GraphpatchError
from graphpatch.report import printable

NAN_IN_FILE = "holds NaN logits, which compare to nothing: record it again"


class GoldenError(GraphpatchError):
    """A golden file that cannot be checked here (another model, bad file)."""


def read(file: str | Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    """A golden file's arrays and metadata, checked for what ``check`` reads.

    Raises:
        GoldenError: a missing, unreadable or malformed file, or one holding
            NaN logits, in one line.
    """
    arrays, metadata = load_checked(Path(file))
    for i in range(prompt_count(arrays)):
        if mx.isnan(arrays[f"logits.{i}"]).any().item():
            raise GoldenError(f"{file}: logits.{i} {NAN_IN_FILE}")
    return arrays, metadata


def prompt_count(arrays: dict[str, mx.array]) -> int:
    return len([k for k in arrays if k.startswith("tokens.")])


def load_checked(file: Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    """A golden file's arrays and metadata, checked for their shapes."""
    try:
        regular_file(file, "golden file")
        check_safetensors(file)
    except LoadError as e:
        reason = str(e).removeprefix(f"{file}: ")
        raise GoldenError(f"{file}: not a golden file ({reason})") from None
    try:
        arrays, metadata = mx.load(
            str(file), format="safetensors", return_metadata=True
        )
    except Exception as e:
        raise GoldenError(f"{file}: not a golden file ({e})") from None
    problem = _problem(arrays, metadata)
    if problem:
        raise GoldenError(f"{file}: not a golden file ({problem})")
    return arrays, metadata


def _problem(arrays: dict[str, mx.array], metadata: dict[str, str]) -> str | None:
    required = ("config_hash", "weights_hash", "tolerance")  # weights_stat: optional
    missing = [k for k in required if k not in metadata]
    if missing:
        return f"no {missing[0]} in its metadata"
    try:
        atol, rtol = (float(x) for x in metadata["tolerance"].split(","))
    except ValueError:
        return f"tolerance {printable(metadata['tolerance'])!r} is not two numbers"
    if not (0 <= atol < float("inf") and 0 <= rtol < float("inf")):
        shown = printable(metadata["tolerance"])
        return f"tolerance {shown!r} is not two finite numbers"
    count = prompt_count(arrays)
    if count == 0:
        return "it holds no prompts (tokens.*)"
    for i in range(count):
        tokens, logits, top = (
            arrays.get(f"{k}.{i}") for k in ("tokens", "logits", "top")
        )
        if tokens is None or logits is None or top is None:
            return f"prompt {i} lacks tokens, logits or top ids"
        if tokens.ndim != 1 or tokens.size == 0 or not _ints(tokens):
            return f"tokens.{i} is not a row of token ids"
        if logits.ndim != 1 or not mx.issubdtype(logits.dtype, mx.floating):
            return f"logits.{i} is not a row of logits"
        if top.ndim != 1 or top.size == 0 or not _ints(top):
            return f"top.{i} is not a row of ids"
        if not (0 <= top.min().item() and top.max().item() < logits.size):
            return f"top.{i} holds ids outside logits.{i}"
    return None


def _ints(array: mx.array) -> bool:
    return mx.issubdtype(array.dtype, mx.integer)


def tensors_hash(model_dir: Path) -> str:
    """sha256 of every tensor's name, dtype, shape and bytes, in name order:
    the same tensors hash alike however files shard, order or label them."""
    tensors = {}
    for file in sorted(model_dir.glob("model*.safetensors")):
        start, header = _header(file)
        for name, entry in header.items():
            if name != "__metadata__":
                tensors[name] = (file, start, entry)
    digest = hashlib.sha256()
    with contextlib.ExitStack() as stack:
        opened = {}
        for name in sorted(tensors):
            file, start, entry = tensors[name]
            if file not in opened:
                opened[file] = stack.enter_context(open(file, "rb"))
            digest.update(json.dumps([name, entry["dtype"], entry["shape"]]).encode())
            begin, end = entry["data_offsets"]
            opened[file].seek(start + begin)
            _copy_into(digest, opened[file], end - begin)
    return digest.hexdigest()


def _header(file: Path) -> tuple[int, dict]:
    """Where a safetensors file's data starts, and its header."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return 8 + size, json.loads(f.read(size))


def _copy_into(digest, f, count: int) -> None:
    while count > 0 and (chunk := f.read(min(count, 1 << 20))):
        digest.update(chunk)
        count -= len(chunk)


def bytes_hash(model_dir: Path) -> str:
    """The weight files' bytes: what files recorded before tensor hashes hold."""
    digest = hashlib.sha256()
    for file in sorted(model_dir.glob("model*.safetensors")):
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
