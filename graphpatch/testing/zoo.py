"""A zoo of real mlx-lm model directories for tests, benchmarks and the demo.

Each entry is a small config for a real mlx-lm architecture; any other
architecture gets the coverage's small config. ``build`` creates
the model with seeded weights, optionally casts or quantizes it with mlx-lm's
own ``quantize_model``, and writes a model directory (config.json,
safetensors, single or sharded with an index, and a tokenizer trained on the
spot) that ``mlx_lm.load`` opens like any checkpoint.
"""

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import quantize_model

from graphpatch import golden
from graphpatch.loading import write_safetensors
from graphpatch.testing import small_configs
from graphpatch.testing.small_configs import VOCAB, make_model

_BASE = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": VOCAB,
    "max_position_embeddings": 1024,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 2,
}

CONFIGS: dict[str, dict] = {
    "llama": {"model_type": "llama", "tie_word_embeddings": True},
    "llama_untied": {"model_type": "llama", "tie_word_embeddings": False},
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": True},
    "qwen3": {
        "model_type": "qwen3",
        "head_dim": 32,
        "tie_word_embeddings": True,
        "rope_theta": 1e6,
    },
    "qwen3_moe": {
        "model_type": "qwen3_moe",
        "head_dim": 32,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "moe_intermediate_size": 128,
        "rope_theta": 1e6,
        "tie_word_embeddings": False,
        "norm_topk_prob": True,
    },
    "mixtral": {
        "model_type": "mixtral",
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "tie_word_embeddings": False,
    },
    "deepseek_v3": {
        "model_type": "deepseek_v3",
        "num_hidden_layers": 3,
        "moe_intermediate_size": 128,
        "num_key_value_heads": 4,
        "n_shared_experts": 1,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "kv_lora_rank": 32,
        "q_lora_rank": 64,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "qk_nope_head_dim": 32,
        "first_k_dense_replace": 1,
        "n_group": 2,
        "topk_group": 1,
    },
    "gemma2": {
        "model_type": "gemma2",
        "head_dim": 32,
        "query_pre_attn_scalar": 32,
        "final_logit_softcapping": 30.0,
    },
    "phi3": {"model_type": "phi3", "num_key_value_heads": 4},
    "gpt_oss": {
        "model_type": "gpt_oss",
        "intermediate_size": 128,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "head_dim": 32,
        "sliding_window": 16,
        "max_position_embeddings": 131072,
        "layer_types": ["sliding_attention", "full_attention"],
    },
}

# Modes mlx-lm's quantize_model takes, by the short names the zoo uses.
QUANTIZATIONS = {
    "affine4": {"mode": "affine", "bits": 4, "group_size": 64},
    "affine8": {"mode": "affine", "bits": 8, "group_size": 64},
    "mxfp4": {"mode": "mxfp4", "bits": 4, "group_size": 32},
    "mxfp8": {"mode": "mxfp8", "bits": 8, "group_size": 32},
    "nvfp4": {"mode": "nvfp4", "bits": 4, "group_size": 16},
}


def _mixed(path: str, module: nn.Module) -> bool | dict:
    """A recipe as real checkpoints have: an 8-bit embedding and head over
    4-bit layers, and the last layer's MLP left in float."""
    if path.endswith(("embed_tokens", "lm_head")):
        return {"mode": "affine", "bits": 8, "group_size": 32}
    return not (path.startswith("model.layers.1.mlp") and "experts" not in path)


QUANTIZATIONS["mixed"] = {
    "mode": "affine",
    "bits": 4,
    "group_size": 64,
    "quant_predicate": _mixed,
}

CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps.",
    "Language models predict the next token from the tokens before it.",
    "A pass rewrites a module, a check proves the rewrite, a report says why.",
    "Experts in a mixture are chosen per token by a small router network.",
    "Hello world! Numbers like 1234 and 5678 appear in text, too.",
    "Once upon a time there was a model that ran on every rank at once.",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def config_for(name: str, **overrides) -> dict:
    """The zoo's config of ``name``, or for any other architecture of the
    installed mlx-lm its small config (``small_configs``); overrides change
    fields, None removes one."""
    if name not in CONFIGS:
        if name not in small_configs.architectures():
            known = ", ".join(CONFIGS)
            raise KeyError(
                f"no zoo model or mlx-lm architecture '{name}' (zoo: {known})"
            )
        return small_configs.config(name, **overrides)
    config = {**_BASE, **CONFIGS[name], **overrides}
    return {k: v for k, v in config.items() if v is not None}  # None removes


def build(
    name: str,
    out: str | Path,
    dtype: str = "float32",
    quant: str | None = None,
    shards: int = 1,
    seed: int = 0,
    head: str | None = None,
    norms: str | None = None,
    **overrides,
) -> Path:
    """Write a zoo model directory and return its path.

    Args:
        name: a key of ``CONFIGS``, or any mlx-lm architecture.
        out: the directory to create.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for the float arrays.
        quant: a key of ``QUANTIZATIONS`` to quantize with mlx-lm, or None.
        shards: how many safetensors files (more than 1 writes an index).
        seed: the weight seed.
        head: ``same`` or ``negated``: also write ``lm_head.*`` arrays equal
            to the embedding or to its negation, in the embedding's format
            (what a tied model's checkpoint may carry and mlx-lm drops).
        norms: a dtype for the norms' weights alone (``float32`` over a
            ``float16`` model: what converters keep, and what makes the model
            compute in float32 while most of its floats are half).
        overrides: config fields to change (None removes a field).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = config_for(name, **overrides)
    model = make_model(config, seed)
    model.set_dtype(getattr(mx, dtype))
    if quant is not None:
        with contextlib.redirect_stdout(io.StringIO()):
            model, config = quantize_model(model, config, **QUANTIZATIONS[quant])
    if norms is not None:
        for _, module in model.named_modules():
            if isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
                module.weight = module.weight.astype(getattr(mx, norms))
    weights = dict(tree_flatten(model.parameters()))
    if head is not None:
        weights.update(_checkpoint_head(model.model.embed_tokens, head == "negated"))
    write_weights(out, weights, shards)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(out)
    return out


def _checkpoint_head(embedding: nn.Module, negated: bool) -> dict[str, mx.array]:
    if not negated:
        return {f"lm_head.{k}": v for k, v in embedding.parameters().items()}
    if not isinstance(embedding, nn.QuantizedEmbedding):
        return {"lm_head.weight": -embedding.weight}
    q = {"group_size": embedding.group_size, "bits": embedding.bits}
    biases = embedding.get("biases")
    dense = mx.dequantize(
        embedding.weight, embedding.scales, biases, **q, mode=embedding.mode
    )
    arrays = mx.quantize(-dense, **q, mode=embedding.mode)
    names = ["lm_head.weight", "lm_head.scales", "lm_head.biases"][: len(arrays)]
    return dict(zip(names, arrays, strict=True))


def write_weights(out: Path, weights: dict[str, mx.array], shards: int = 1) -> None:
    """Save weights as mlx-lm does, in ``shards`` files (an index above one)."""
    names = sorted(weights)
    parts = [{k: weights[k] for k in names[i::shards]} for i in range(shards)]
    write_safetensors(out, parts if shards > 1 else [weights])


def write_tokenizer(out: Path) -> None:
    """Train a small byte-level BPE tokenizer and save it the way Hugging Face
    checkpoints ship one (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


# The golden files of golden/, checked by tests/test_golden.py:
# (architecture, build options, passes).
ZOO: list[tuple[str, dict[str, Any], str]] = [
    ("llama", {}, ""),
    ("llama", {}, "untied_head"),
    ("llama", {}, "fuse_glu"),
    ("llama", {}, "last_token"),
    ("llama", {}, "fuse_glu,last_token"),
    ("llama", {}, "fuse_qkv"),
    ("llama", {"head": "negated"}, "untied_head"),
    ("qwen3_moe", {"quant": "affine4"}, ""),
    ("qwen3_moe", {"quant": "affine4"}, "fuse_glu"),
    ("qwen3_moe", {"quant": "affine4"}, "fuse_glu,last_token"),
    ("qwen3_moe", {"quant": "affine4"}, "fuse_glu,fuse_qkv,last_token"),
    ("gemma2", {}, ""),
    ("gemma2", {}, "last_token"),
]


def zoo_file_name(name: str, build: dict, passes: str) -> str:
    parts = [name, *(f"{k}-{v}" for k, v in sorted(build.items()))]
    parts.append(passes.replace(",", "+").replace(":", "-") or "unpatched")
    return "_".join(parts) + ".safetensors"


def record_zoo(out_dir: str | Path, work_dir: str | Path) -> list[Path]:
    """Re-record every golden file of the zoo (a reviewed change: the diff of
    golden/ is what a reviewer reads)."""
    written = []
    for name, options, passes in ZOO:
        key = name + "".join(f"-{k}={v}" for k, v in sorted(options.items()))
        model_dir = Path(work_dir) / key
        if not model_dir.is_dir():
            build(name, model_dir, **options)
        out = Path(out_dir) / zoo_file_name(name, options, passes)
        extra = {"zoo": json.dumps({"name": name, "build": options})}
        written.append(golden.record(model_dir, out, passes, extra=extra))
    return written


def main() -> None:
    import sys

    names = {*CONFIGS, *small_configs.architectures()}
    if len(sys.argv) != 3 or sys.argv[1] not in names:
        sys.exit(
            "usage: python -m graphpatch.testing.zoo ARCHITECTURE OUT_DIR "
            f"(the zoo's: {', '.join(CONFIGS)}; or any mlx-lm architecture)"
        )
    print(f"wrote {build(sys.argv[1], sys.argv[2])}")


if __name__ == "__main__":
    main()
