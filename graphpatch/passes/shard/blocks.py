"""The blocks the pass shards, found by structure, and the plan of one.

A plan says, for ``n`` ranks, which layers of a block are split on which
axis and where each rank's part lies, which head counts change and to what,
which per-head arrays are sliced, and whether the block sums its own output.
It depends on ``n`` alone, so every rank makes the same one (``plan``);
``rank.local`` then builds one rank's block from it.
"""

from dataclasses import dataclass, field
from typing import TypeVar

import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from graphpatch.contract import walk
from graphpatch.passes.shard.split import Ranges

# Projections whose outputs a block's heads, or its hidden units, split.
QKV = ("q_proj", "k_proj", "v_proj")
FUSED_QKV = ("qkv_proj", "c_attn", "query_key_value", "Wqkv", "wqkv", "W_pack", "qkv")
OUTPUTS = ("o_proj", "out_proj", "dense", "wo", "c_proj")
# Multi-head latent attention (deepseek's MLA): the query, or its low-rank
# up projection.
LATENT_Q = ("q_b_proj", "q_proj")
FUSED_GLU = "gate_up_proj"  # phi3's and glm4's [gate; up]
MLPS = (
    (("gate_proj", "up_proj"), "down_proj"),
    ((FUSED_GLU,), "down_proj"),
    (("w1", "w3"), "w2"),
    (("c_fc",), "c_proj"),
    (("fc1",), "fc2"),
    (("dense_h_to_4h",), "dense_4h_to_h"),
)
EXPERTS = (SwitchLinear, QuantizedSwitchLinear)
DENSE = (nn.Linear, nn.QuantizedLinear)


@dataclass
class Plan:
    """How one block is sharded over ``n`` ranks (plain numbers and names).

    Attributes:
        parts: child path -> (axis, every rank's ranges, whether mlx's
            sharded layer replaces it); an axis is ``rows`` (outputs) or
            ``cols`` (inputs).
        counts: attribute -> its value on every rank.
        arrays: the block's own array -> every rank's ranges on axis 0.
        summed: the block's output is a partial sum the block itself sums
            (its parts are split in place, as MoE experts are).
        before: the counts' values before the rewrite, for ``undo``.
    """

    n: int
    parts: dict[str, tuple[str, list[Ranges], bool]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    arrays: dict[str, list[Ranges]] = field(default_factory=dict)
    summed: bool = False
    before: dict[str, int] = field(default_factory=dict)  # counts, unsharded
    layout: str = "segments"  # a fused qkv's (``layouts``)
    experts: str = ""  # shard:experts: the child whose experts are this rank's


def kind_of(module: nn.Module) -> str | None:
    """``attention``, ``mlp`` or ``moe`` for a block the pass shards;
    ``recurrent`` for one it finds and keeps whole."""
    if experts_in(module):
        return "moe"
    if isinstance(module.get("conv1d"), nn.Conv1d) and out_name(module):
        return "recurrent"
    if out_name(module) and (
        all(isinstance(module.get(k), nn.Module) for k in QKV)
        or fused_name(module)
        or latent_q(module)
    ):
        return "attention"
    if mlp_names(module, DENSE):
        return "mlp"
    return None


def find_blocks(model: nn.Module, moe_only: bool) -> list[tuple[str, str]]:
    """(path, kind) of every block, in reading order; an MoE block's shared
    experts belong to it (one sum for routed and shared)."""
    found: list[tuple[str, str]] = []
    inside: list[str] = []
    for path, module in walk(model):
        if any(path.startswith(p + ".") for p in inside):
            continue
        kind = kind_of(module)
        if kind == "moe":
            inside.append(path)
        if kind and (kind == "moe" or not moe_only):
            found.append((path, kind))
    return found


T = TypeVar("T")


def found(value: T | None) -> T:
    """A part ``find_blocks`` saw in the block (the block is one it found)."""
    if value is None:
        raise ValueError("not a block shard finds")
    return value


def out_name(module: nn.Module) -> str | None:
    return next((k for k in OUTPUTS if isinstance(module.get(k), nn.Module)), None)


def latent_q(module: nn.Module) -> str | None:
    """The query projection of an attention with no k and v projections."""
    if any(isinstance(module.get(k), nn.Module) for k in QKV[1:]):
        return None
    return next((k for k in LATENT_Q if isinstance(module.get(k), nn.Module)), None)


def fused_name(module: nn.Module) -> str | None:
    return next((k for k in FUSED_QKV if isinstance(module.get(k), nn.Module)), None)


def mlp_names(
    module: nn.Module, kinds: tuple[type, ...]
) -> tuple[tuple[str, ...], str] | None:
    """The (up projections, down projection) of an MLP of layers ``kinds``."""
    for ups, down in MLPS:
        if all(isinstance(module.get(k), kinds) for k in (*ups, down)):
            return ups, down
    return None


def experts_in(module: nn.Module) -> str | None:
    """The child holding a block's routed experts (a SwitchGLU), if any."""
    for key, child in module.items():
        if isinstance(child, nn.Module) and mlp_names(child, EXPERTS):
            return key
    return None
