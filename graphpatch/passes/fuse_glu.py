"""fuse_glu: gate_proj + up_proj as one matmul.

Rewrite:       m.gate_proj(x), m.up_proj(x) -> the two halves of one
               m.gate_up_proj(x), whose arrays are [gate; up] concatenated on
               the output axis (weight, scales, biases, bias); a GLU named
               w1/w2/w3 (internlm2, lfm2) likewise: w1, w3 -> m.w13. m keeps
               its class and its own __call__, so any activation keeps
               working, whichever of the two is the gate; SwitchGLU runs one
               gather_mm / gather_qmm for both.
Preconditions: gate_proj and up_proj are layers of one supported kind (Linear,
               QuantizedLinear, their all-to-sharded forms, SwitchLinear,
               QuantizedSwitchLinear) with equal input dims, bias-ness,
               quantization (bits, group size, mode), dtypes and global scales.
Equivalence:   every output of m, all positions, within the dtype tolerance.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from graphpatch import fusion, tapped
from graphpatch.contract import (
    Context,
    Options,
    Pass,
    Probe,
    Proof,
    Settings,
    Site,
    Tap,
    module_at,
    walk,
)
from graphpatch.parts import FusedPart

LAYERS = (*fusion.DENSE, SwitchLinear, QuantizedSwitchLinear)
EXPERTS = (SwitchLinear, QuantizedSwitchLinear)
# fused name -> the projections it joins (the MLP applies each to its x)
FUSIONS: dict[str, tuple[str, ...]] = {
    "gate_up_proj": ("gate_proj", "up_proj"),
    "w13": ("w1", "w3"),
}
KINDS = ("dense", "moe")  # the sites fuse_glu may rewrite
SORTED = 64  # SwitchGLU sorts tokens by expert from this many indices on

ALREADY_APPLIED = "already applied"
ALREADY_FUSED = "already fused (gate_up_proj) in the model itself"
# MLPs with one up projection, reported rather than passed over in silence.
OTHER_MLPS = [
    ("c_fc", "c_proj"),
    ("fc1", "fc2"),
    ("dense_h_to_4h", "dense_4h_to_h"),
]
NOT_GLU = "an MLP with one up projection ({kind}): nothing to fuse"
SLOWER = (
    "fused measured slower (unfused/fused {decode:.3f} decode, {prefill:.3f} "
    "prefill), kept unfused"
)


def glu_names(module: nn.Module) -> tuple[str, ...] | None:
    """The two input projections of a GLU (``gate_proj``/``up_proj``, or
    ``w1``/``w3`` beside a ``w2``), or None."""
    for names in FUSIONS.values():
        found = all(isinstance(module.get(name), nn.Module) for name in names)
        # w1 and w3 make a GLU only beside its w2 (the down projection)
        if found and (names[0] != "w1" or "w2" in module):
            return names
    return None


def find(model: nn.Module, options: Options, context: Context) -> list[Site]:
    sites = []
    for path, module in walk(model):
        if names := glu_names(module):
            kind = "moe" if _is_experts(module, *names) else "dense"
            sites.append(Site(path, kind))
        elif "gate_up_proj" in module and "down_proj" in module:
            sites.append(Site(path, "fused", skip=ALREADY_FUSED))
        elif other := _other_mlp(module):
            sites.append(Site(path, other, skip=NOT_GLU.format(kind=other)))
    return sites


def _other_mlp(module: nn.Module) -> str | None:
    for names in OTHER_MLPS:
        if all(isinstance(module.get(k), nn.Module) for k in names):
            return "/".join(names)
    return None


def _is_experts(module: nn.Module, *names: str) -> bool:
    layer = fusion.layer_of(module, names[0])
    if isinstance(layer, FusedPart):
        return isinstance(module[fusion.names_in(module, FUSIONS)[1]], EXPERTS)
    return isinstance(layer, EXPERTS)


def why_not(
    model: nn.Module, site: Site, options: Options, context: Context
) -> str | None:
    module = module_at(model, site.path)
    names = glu_names(module)
    if names is None:
        return ALREADY_FUSED
    if fusion.parts_in(module, names):
        return ALREADY_APPLIED
    if "gate_up_proj" in module:
        return ALREADY_FUSED
    layers = {name: fusion.layer_of(module, name) for name in names}
    return fusion.why_not_joined(layers, LAYERS)


def _inputs(
    model: nn.Module,
    site: Site,
    dtype: mx.Dtype | None,
    shapes: list[tuple[int, int]],
    k: int = 2,
) -> list[tuple[mx.array, ...]]:
    """Synthetic inputs of ``dtype``: (x,) or, for experts, (x, indices)."""
    module = module_at(model, site.path)
    names, fused = fusion.names_in(module, FUSIONS)
    layer = module.get(fused) or fusion.layer_of(module, names[0])
    dims = layer.scales.shape[-1] * layer.group_size if "scales" in layer else None
    dims = dims or layer.weight.shape[-1]
    experts = layer.weight.shape[0] if site.kind == "moe" else 0
    inputs = []
    for i, (B, L) in enumerate(shapes):
        x = mx.random.normal((B, L, dims), key=mx.random.key(2 * i)).astype(dtype)
        shape = (B, L, min(k, experts))
        idx = mx.random.randint(0, max(experts, 1), shape, key=mx.random.key(2 * i + 1))
        inputs.append((x, idx) if experts else (x,))
    return inputs


def taps(model: nn.Module, options: Options, context: Context) -> list[Tap]:
    return [
        (s.path, "__call__") for s in find(model, options, context) if s.kind in KINDS
    ]


def probe(model: nn.Module, site: Site, options: Options, context: Context) -> Probe:
    # The inputs the model fed the site in the reference forward, in their
    # real dtype; synthetic ones only where none were recorded, and for
    # SwitchGLU's sorted path (indices.size >= 64), which a short probe's
    # real indices do not reach: (2, 16) tokens, as many experts each.
    inputs = tapped.inputs(context.recorded, (site.path, "__call__"))
    if not inputs:
        inputs = _inputs(model, site, context.dtype, [(1, 1), (2, 16)])
    elif site.kind == "moe" and max(args[1].size for args in inputs) < SORTED:
        x, idx = inputs[0][:2]
        inputs += _inputs(model, site, x.dtype, [(2, 16)], k=idx.shape[-1])

    def run() -> list[mx.array]:
        module = module_at(model, site.path)
        return [module(*args) for args in inputs]

    return run


def tune(
    model: nn.Module, site: Site, options: Options, context: Context
) -> tuple[dict[str, float], str | None]:
    """Time the fused site against the unfused one on decode (B=1, L=1) and
    prefill (B=1, L=128) shapes; undo the fusion where either is slower."""
    shapes = {"decode": (1, 1), "prefill": (1, 128)}
    calls = {
        name: _inputs(model, site, context.dtype, [shape])[0]
        for name, shape in shapes.items()
    }
    module = module_at(model, site.path)
    names, fused = fusion.names_in(module, FUSIONS)
    ratios = fusion.timed(module, names, fused, calls)
    if min(ratios.values()) < 1.0:
        fusion.unfuse(module, names, fused)
        return ratios, SLOWER.format(**ratios)
    return ratios, None


HOOKS = fusion.hooks(FUSIONS)
PASS = Pass(
    name="fuse_glu",
    summary="gate_proj + up_proj as one matmul (dense and MoE, any activation)",
    find=find,
    why_not=why_not,
    rewrite=HOOKS.rewrite,
    undo=HOOKS.undo,
    applied=HOOKS.applied,
    replaced=HOOKS.replaced,
    proof=Proof(probe, taps=taps, tune=tune),
    saving=HOOKS.saving,
    settings=Settings(defaults={"tune": False}),
)
