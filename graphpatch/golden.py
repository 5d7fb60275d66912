"""Golden logits: record a model's logits once, check every later build.

A golden file is a small safetensors file: per prompt its token ids, the
float32 logits of its last position and their top-k ids, plus metadata
(graphpatch, mlx and mlx-lm versions, platform and device, hashes of the
model's config and tensors, dtype, passes, tolerance). ``check`` recomputes
and compares, and refuses a file recorded from another model; a plain save
is the model it was saved from (its graphpatch section and the layout of its
files are left out of the hashes).

Verdicts, per prompt. The error is ``verify.compare``'s: a token masked with
the same infinity in the file and now (-inf, phi3small's) is no error, and
only finite logits scale the tolerance. FAILED: an error over tolerance, an
infinity on one side only, NaN now, or a changed top-1 whatever the error (a
golden check exists to catch that; a tie keeps it). A file holding NaN is
refused (GoldenError, "holds NaN logits"), and ``record`` never writes one.
``record`` writes nothing into a model directory (one holding config.json:
mlx-lm could read it as weights) and replaces only an earlier golden file.
"""

import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx_lm

import graphpatch
from graphpatch._version import __version__
from graphpatch.checks import check_weights, read_config
from graphpatch.compare import (
    PROBE_TOKENS,
    TOLERANCE,
    compare,
    dtype_name,
    logits_dtype,
)
from graphpatch.golden_file import (
    GoldenError,
    bytes_hash,
    load_checked,
    prompt_count,
    read,
    tensors_hash,
)
from graphpatch.limits import check_tokens
from graphpatch.loading import quiet_transformers, write_failure
from graphpatch.opening import load
from graphpatch.report import printable

TOP_K = 8
DEFAULT_PROMPTS = [*PROBE_TOKENS, [5, 9, 33, 2, 17, 41, 8, 3, 12, 60, 1, 7, 22, 48, 19]]
# Metadata that names the model: a file recorded from another is refused.
IDENTITY = ("config_hash", "weights_hash", "weights_hash_of", "weights_stat")
TENSORS = "tensors"  # weights_hash_of: how the weights were hashed
NAN_FROM_MODEL = "gives NaN logits: there is nothing to record"
IN_A_MODEL_DIR = (
    "is a model directory (it holds config.json), where mlx-lm could read a "
    "golden file as weights: write it outside"
)


def config_hash(model_dir: Path) -> str:
    """The config's hash without graphpatch's own section: a save of the
    model is the model whose golden file it checks against."""
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("graphpatch", None)
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def weights_hash(model_dir: Path) -> str:
    """The hash of the tensors the model directory's weight files hold."""
    return tensors_hash(model_dir)


def weights_stat(model_dir: Path) -> str:
    """Each weight file's name, size and mtime: when they are as recorded, a
    check trusts the recorded hash instead of reading every byte again."""
    files = sorted(model_dir.glob("model*.safetensors"))
    return json.dumps([[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files])


def identity(model_dir: Path, recorded: dict[str, str] | None = None) -> dict:
    """The metadata that names the model. Against a ``recorded`` file: its
    weights hash is trusted while the files' stat is as recorded, and is of
    the files' bytes where the file predates tensor hashes."""
    recorded = recorded or {}
    if recorded.get("weights_stat") == weights_stat(model_dir):
        weights = recorded.get("weights_hash")
    elif recorded and recorded.get("weights_hash_of") != TENSORS:
        weights = bytes_hash(model_dir)
    else:
        weights = weights_hash(model_dir)
    return {"config_hash": config_hash(model_dir), "weights_hash": weights}


def _logits(model, prompts: list[list[int]]) -> list[mx.array]:
    rows = [model(mx.array([p]))[0, -1].astype(mx.float32) for p in prompts]
    mx.eval(rows)
    return rows


def _model(model_dir: Path, passes: str):
    model, tokenizer = load(model_dir)
    if passes:
        graphpatch.apply(model, passes, model_dir=str(model_dir))
    return model, tokenizer


def _metadata(model, passes: str) -> dict[str, str]:
    """What a file records besides the model's identity."""
    dtype = logits_dtype(model)
    atol, rtol = TOLERANCE.get(dtype, TOLERANCE[mx.float32])
    return {
        "graphpatch": __version__,
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "platform": platform.platform(),
        "device": str(mx.default_device()),
        "dtype": dtype_name(dtype),
        "passes": passes,
        "tolerance": f"{atol},{rtol}",
    }


def record(
    model_dir: str | Path,
    out: str | Path,
    passes: str = "",
    prompts: list[str] | None = None,
    extra: dict[str, str] | None = None,
) -> Path:
    """Write the golden file of ``model_dir`` (patched with ``passes``).

    Args:
        model_dir: a local mlx-lm model directory.
        out: the safetensors file to write.
        passes: pass specs, comma-separated ("" for the unpatched model).
        prompts: texts to tokenize; default: fixed token ids.
        extra: more metadata to store (e.g. how to rebuild a zoo model).
    """
    model_dir, out = Path(model_dir), Path(out)
    read_config(model_dir)
    _check_out(out)
    if prompts is not None and not prompts:
        raise GoldenError("no prompts given (an empty prompts file?)")
    model, tokenizer = _model(model_dir, passes)
    with quiet_transformers():
        ids = [tokenizer.encode(p) for p in prompts] if prompts else DEFAULT_PROMPTS
    check_tokens(model, ids, "golden prompt")
    arrays = {}
    for i, (tokens, logits) in enumerate(zip(ids, _logits(model, ids), strict=True)):
        if mx.isnan(logits).any().item():
            raise GoldenError(f"{model_dir} {NAN_FROM_MODEL} (prompt {i})")
        arrays[f"tokens.{i}"] = mx.array(tokens, mx.int32)
        arrays[f"logits.{i}"] = logits
        arrays[f"top.{i}"] = mx.argsort(-logits)[:TOP_K].astype(mx.int32)
    metadata = {
        **identity(model_dir),
        "weights_hash_of": TENSORS,
        "weights_stat": weights_stat(model_dir),
        **_metadata(model, passes),
        **(extra or {}),
    }
    # mx.save_safetensors appends .safetensors to other names: write a
    # temporary name it keeps, then rename, so OUT is exactly what was asked.
    tmp = out.parent / f".{out.name}.graphpatch-{os.getpid()}.safetensors"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(tmp), arrays, metadata)
        os.replace(tmp, out)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        raise GoldenError(f"cannot write {out}: {write_failure(e)}") from None
    return out


def _check_out(out: Path) -> None:
    """OUT may be new, or a golden file to record again; nothing else, and
    never inside a model directory."""
    if out.is_dir():
        raise GoldenError(f"{out} is a directory: name the golden file to write")
    for parent in dict.fromkeys([out.parent, out.resolve().parent]):
        if (parent / "config.json").exists():
            raise GoldenError(f"{out}: {parent} {IN_A_MODEL_DIR}")
    if out.exists() or out.is_symlink():
        try:
            load_checked(out)
        except GoldenError:
            raise GoldenError(
                f"{out} exists and is not a golden file: it is never replaced"
            ) from None


@dataclass
class GoldenResult:
    ok: bool
    lines: list[str] = field(default_factory=list)

    @property
    def diff(self) -> str:
        return "\n".join(self.lines)


def check(
    model_dir: str | Path, file: str | Path, passes: str | None = None
) -> GoldenResult:
    """Recompute the golden file's logits and compare.

    Args:
        model_dir: the model directory the file was recorded from.
        file: a golden file written by ``record``.
        passes: pass specs to apply; default: the ones it was recorded with.

    Raises:
        GoldenError: the file is unreadable or was recorded from another model.
    """
    model_dir = Path(model_dir)
    read_config(model_dir)
    check_weights(model_dir)
    arrays, recorded = read(file)
    passes = recorded.get("passes", "") if passes is None else passes
    for key, value in identity(model_dir, recorded).items():
        if recorded.get(key) != value:
            raise GoldenError(
                f"{file} was recorded from another model: its {key.replace('_', ' ')} "
                f"differs from {model_dir}'s"
            )
    model, _ = _model(model_dir, passes)
    now = _metadata(model, passes)
    atol, rtol = (float(x) for x in recorded["tolerance"].split(","))
    prompts = [arrays[f"tokens.{i}"].tolist() for i in range(prompt_count(arrays))]
    check_tokens(model, prompts, f"{file}")
    result = GoldenResult(True)
    for i, logits in enumerate(_logits(model, prompts)):
        if logits.shape != arrays[f"logits.{i}"].shape:
            raise GoldenError(
                f"{file}: logits.{i} has {arrays[f'logits.{i}'].size} entries, the "
                f"model gives {logits.size}"
            )
        line, ok = _compare(i, arrays, logits, atol, rtol)
        result.lines.append(line)
        result.ok &= ok
    changed = [
        f"{key}: {printable(recorded.get(key) or '(none)')} -> "
        f"{printable(now[key] or '(none)')}"
        for key in now
        if key not in IDENTITY and recorded.get(key) != now[key]
    ]
    if changed:
        result.lines.append("metadata changed: " + "; ".join(changed))
    return result


def _compare(i: int, arrays: dict, logits: mx.array, atol: float, rtol: float):
    golden = arrays[f"logits.{i}"].astype(mx.float32)
    head = f"prompt {i} ({arrays[f'tokens.{i}'].size} tokens): "
    if problem := _unlike(golden, logits):
        return head + problem + ": FAILED", False
    error = compare([golden[None]], [logits[None]]).max_error
    # verify.compare's rule: only finite values scale the tolerance.
    scale = mx.max(mx.where(mx.isfinite(golden), mx.abs(golden), 0)).item()
    tolerance = atol + rtol * scale
    golden_top1, top1 = int(arrays[f"top.{i}"][0].item()), int(mx.argmax(logits).item())
    kept = logits[golden_top1].item() >= logits[top1].item()  # a tie keeps it
    where = ""
    if error > 0:
        moved = mx.where(golden == logits, 0, mx.abs(golden - logits))
        where = f" at vocab id {int(mx.argmax(moved).item())}"
    ok = error <= tolerance and kept
    line = (
        f"{head}max abs error {error:.3g}{where} (tolerance {tolerance:.3g}), "
        f"top-1 " + ("same" if kept else f"{golden_top1} -> {top1}")
    )
    return line + (": ok" if ok else ": FAILED"), ok


def _unlike(golden: mx.array, logits: mx.array) -> str | None:
    """What no tolerance can pass: NaN now, or an infinity on one side only."""
    if (nan := int(mx.isnan(logits).sum().item())) > 0:
        first = int(mx.argmax(mx.isnan(logits)).item())
        return f"the model gives NaN at {nan} vocab ids (first {first})"
    odd = (mx.isinf(golden) | mx.isinf(logits)) & (golden != logits)
    if (count := int(odd.sum().item())) == 0:
        return None
    j = int(mx.argmax(odd).item())
    return (
        f"{count} vocab ids infinite on one side only (first {j}: "
        f"{golden[j].item():.3g} in the file, {logits[j].item():.3g} now)"
    )


def assert_matches(
    model_dir: str | Path, file: str | Path, passes: str | None = None
) -> None:
    """A pytest helper: raise AssertionError with the diff when logits moved."""
    result = check(model_dir, file, passes)
    assert result.ok, f"golden logits moved ({file}):\n{result.diff}"
