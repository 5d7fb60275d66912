"""Small configs for every mlx-lm architecture, derived from its ModelArgs.

The fields every architecture shares get small values; other required fields
get a plain value of their type; a wrapper's nested language-model config is
small as well, and the fields it turns out to need are filled in when the
wrapper asks for them. What still cannot be built raises, and the coverage
table says why.
"""

import dataclasses
import importlib
import importlib.util
import pkgutil
import re
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx_lm.models
from mlx.utils import tree_flatten

from graphpatch.checks import model_classes
from graphpatch.testing.hints import HINTS

VOCAB = 512  # the zoo's tokenizers fit it
# Small values for the fields the architectures share; the rest keep defaults.
SMALL: dict[str, Any] = {
    "hidden_size": 256,
    "dim": 256,
    "d_model": 256,
    "n_embd": 256,
    "num_hidden_layers": 2,
    "n_layers": 2,
    "n_layer": 2,
    "num_layers": 2,
    "intermediate_size": 512,
    "ffn_dim": 512,
    "hidden_dim": 512,
    "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64,
    "num_attention_heads": 4,
    "n_heads": 4,
    "n_head": 4,
    "num_heads": 4,
    "num_key_value_heads": 2,
    "n_kv_heads": 2,
    "num_kv_heads": 2,
    "head_dim": 64,
    "vocab_size": VOCAB,
    "n_vocab": VOCAB,
    "num_experts": 8,
    "num_local_experts": 8,
    "n_routed_experts": 8,
    "moe_num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "n_shared_experts": 1,
    # position tables must cover the probe: a plain 2 made gpt2's wpe read
    # past its end (a gather is not bounds-checked), hence "different logits
    # from the same seed" and non-finite ones; and not have VOCAB rows, or
    # they could pass for the token embedding
    "max_position_embeddings": 1024,
    "n_positions": 1024,
    "n_ctx": 1024,
    "rms_norm_eps": 1e-5,
    "layer_norm_eps": 1e-5,
    "norm_eps": 1e-5,
    "rope_theta": 10000.0,
    # every other layer slides: the patterns fit in 2 layers
    "sliding_window_pattern": 2,
    "sliding_window": 64,
    # hybrids: attention (and experts) at layer 1 of every 2
    "attn_layer_offset": 1,
    "attn_layer_period": 2,
    "expert_layer_offset": 1,
    "expert_layer_period": 2,
    "full_attn_idxs": [1],
    # rope over an even number of dims; per-head sizes that match head_dim
    "partial_rotary_factor": 0.5,
    "kv_channels": 64,
}
# Plain values for required fields of other names, by type.
BY_TYPE = {int: 2, float: 1.0, bool: False, str: "", list: [], dict: {}}
MAX_PARAMETERS = 20_000_000
NESTED = ("text_config", "language_config", "llm_config")


def architectures() -> list[str]:
    """Every module of ``mlx_lm.models`` that defines a Model and ModelArgs."""
    names = []
    for info in pkgutil.iter_modules(mlx_lm.models.__path__):
        spec = importlib.util.find_spec(f"mlx_lm.models.{info.name}")
        if spec is None or spec.origin is None:
            continue
        with open(spec.origin) as f:
            text = f.read()
        if "class Model(" in text and "class ModelArgs(" in text:
            names.append(info.name)
    return sorted(names)


def small_config(name: str, args_class: type) -> dict:
    config: dict[str, Any] = {"model_type": name}
    for f in dataclasses.fields(args_class):
        if f.name == "model_type":  # the loader resolves the module by it
            continue
        if f.name in SMALL:
            config[f.name] = SMALL[f.name]
        elif f.name in NESTED:  # a wrapper's language model: small as well
            config[f.name] = {"model_type": name, **SMALL}
        elif f.name == "layer_types":
            layers = SMALL["num_hidden_layers"] // 2
            config[f.name] = ["sliding_attention", "full_attention"] * layers
        elif f.default is dataclasses.MISSING and (
            f.default_factory is dataclasses.MISSING
        ):
            config[f.name] = _plain_value(f.name, f.type)
        elif f.default is None and _per_layer(f.name, f.type):
            config[f.name] = _plain_value(f.name, f.type)
    return config


def _per_layer(name: str, annotation) -> bool:
    """A list with a flag per layer (``no_rope_layers``, ``is_moe_layer``,
    ``hybrid_layer_pattern``), by its name and type."""
    text = str(getattr(annotation, "__name__", annotation)).replace("typing.", "")
    listed = text.startswith(("list", "List", "Optional[List", "Optional[list"))
    return listed and "layer" in name and "types" not in name


def _plain_value(name: str, annotation):
    if "eps" in name:
        return 1e-5
    if annotation is None:  # known by name only
        if name.endswith("layers") or name.endswith("_types"):
            return []
        return False if name.startswith(("tie_", "use_")) or "bias" in name else 2
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    text = text.replace("typing.", "").removeprefix("Optional[")
    if _per_layer(name, annotation):
        return [1, 0] * (SMALL["num_hidden_layers"] // 2)  # a flag per layer
    for kind, words in (
        (bool, ("bool",)),
        (int, ("int",)),
        (float, ("float",)),
        (str, ("str",)),
        (list, ("list", "List", "tuple", "Tuple")),
        (dict, ("dict", "Dict")),
    ):
        if any(text.startswith(word) for word in words):
            return BY_TYPE[kind]
    return None


def config(name: str, **overrides) -> dict:
    """The small config of architecture ``name``: derived from its
    ModelArgs, then ``HINTS``, then ``overrides`` (None removes a field), with
    the fields a nested config turns out to need filled in."""
    module = importlib.import_module(f"mlx_lm.models.{name}")
    config = small_config(name, module.ModelArgs)
    # A nested config is merged into, not replaced.
    for key, value in (HINTS.get(name, {}) | overrides).items():
        nested = isinstance(value, dict) and isinstance(config.get(key), dict)
        config[key] = config[key] | value if nested else value
    config = {k: v for k, v in config.items() if v is not None}
    _complete(module, config)
    return config


def make_model(
    config: dict, seed: int = 0, dtype: mx.Dtype | None = None, most: int = 0
) -> nn.Module:
    """The mlx-lm model a config describes, as mlx-lm's loader resolves it,
    with seeded weights (cast to ``dtype``), evaluated. Raises ValueError
    past ``most`` parameters (0: no limit), before anything is allocated."""
    model_class, args_class = model_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    size = sum(v.size for _, v in tree_flatten(model.parameters()))
    if most and size > most:  # still lazy: nothing allocated yet
        raise ValueError(f"{size / 1e6:.0f}M parameters from its defaults")
    if dtype is not None:
        model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def build(name: str, **overrides) -> nn.Module:
    """The architecture ``name`` from its small config, in float32."""
    small = config(name, **overrides)
    return make_model(small, dtype=mx.float32, most=MAX_PARAMETERS)


def _complete(module, config: dict, tries: int = 3) -> None:
    """Fill in the fields a nested config turns out to need: its class is
    only known once the wrapper asks for it (building a model is lazy)."""
    for _ in range(tries):
        try:
            module.Model(module.ModelArgs.from_dict(config))
            return
        except TypeError as e:
            missing = re.findall(r"'(\w+)'", str(e).partition("argument")[2])
            if "required positional argument" not in str(e) or not missing:
                raise
            for target in [config, *(config[k] for k in NESTED if k in config)]:
                for key in missing:
                    target.setdefault(key, _plain_value(key, None))
