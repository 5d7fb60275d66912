"""fuse_qkv: q_proj + k_proj + v_proj as one matmul.

Rewrite:       m.q_proj(x), m.k_proj(x), m.v_proj(x) -> the three parts of one
               m.qkv_proj(x), whose arrays are [q; k; v] concatenated on the
               output axis (weight, scales, biases, bias). m keeps its class
               and its own __call__ (rope, norms, caches, any head counts).
Preconditions: q, k and v are layers of one supported kind (Linear,
               QuantizedLinear, their all-to-sharded forms) with equal input
               dims, bias-ness, quantization (bits, group size, mode) and
               dtypes. Runs after fuse_glu and before the head passes.
Equivalence:   the three projections of every input the model fed q_proj,
               within the dtype tolerance, and the model's logits.
"""

import mlx.core as mx
import mlx.nn as nn

from graphpatch import fusion, tapped
from graphpatch.contract import (
    Context,
    Options,
    Pass,
    Probe,
    Proof,
    Site,
    Tap,
    module_at,
    walk,
)

LAYERS = fusion.DENSE
NAMES, FUSED = ("q_proj", "k_proj", "v_proj"), "qkv_proj"
# Attention that ships its projections fused, under the names models use.
SHIPPED = ("qkv_proj", "c_attn", "query_key_value", "Wqkv", "wqkv", "W_pack", "qkv")
OUTPUTS = ("o_proj", "out_proj", "c_proj", "dense", "wo")

ALREADY_APPLIED = "already applied"
ALREADY_FUSED = "already fused ({name}) in the model itself"


def find(model: nn.Module, options: Options, context: Context) -> list[Site]:
    sites = []
    for path, module in walk(model):
        if all(isinstance(module.get(name), nn.Module) for name in NAMES):
            sites.append(Site(path, "attention"))
        elif shipped := _shipped(module):
            sites.append(Site(path, "fused", skip=ALREADY_FUSED.format(name=shipped)))
    return sites


def _shipped(module: nn.Module) -> str | None:
    if not any(name in module for name in OUTPUTS):
        return None  # not an attention block
    return next((n for n in SHIPPED if isinstance(module.get(n), nn.Module)), None)


def why_not(
    model: nn.Module, site: Site, options: Options, context: Context
) -> str | None:
    module = module_at(model, site.path)
    if fusion.parts_in(module, NAMES):
        return ALREADY_APPLIED
    layers = {name: fusion.layer_of(module, name) for name in NAMES}
    return fusion.why_not_joined(layers, LAYERS)


def taps(model: nn.Module, options: Options, context: Context) -> list[Tap]:
    sites = [s for s in find(model, options, context) if s.kind == "attention"]
    return [(f"{s.path}.q_proj", "__call__") for s in sites]


def probe(model: nn.Module, site: Site, options: Options, context: Context) -> Probe:
    # What the attention really fed q_proj in the reference forward; a
    # synthetic input of the site's dtype where the forward did not reach it.
    inputs = tapped.inputs(context.recorded, (f"{site.path}.q_proj", "__call__"))
    if not inputs:
        q = fusion.layer_of(module_at(model, site.path), "q_proj")
        dims = (
            q.scales.shape[-1] * q.group_size if "scales" in q else q.weight.shape[-1]
        )
        x = mx.random.normal((2, 8, dims), key=mx.random.key(0))
        inputs = [(x.astype(context.dtype),)]

    def run() -> list[mx.array]:
        module = module_at(model, site.path)
        # the order attention code calls them in, each on the same input
        return [module[name](*args) for args in inputs for name in NAMES]

    return run


HOOKS = fusion.hooks({FUSED: NAMES})
PASS = Pass(
    name="fuse_qkv",
    summary="q_proj + k_proj + v_proj as one matmul (any head counts, GQA, biases)",
    find=find,
    why_not=why_not,
    rewrite=HOOKS.rewrite,
    undo=HOOKS.undo,
    applied=HOOKS.applied,
    replaced=HOOKS.replaced,
    proof=Proof(probe, taps=taps),
    saving=HOOKS.saving,
)
