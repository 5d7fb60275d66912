"""One rank of the elide_head test: pipeline the model, maybe elide, generate.

argv: MODEL_DIR TEMP MODE, MODE ``plain``, ``elided``, ``gathered``
(elide_head:keep_gather), ``logits`` (last_token,elide_head:logits, sampled
with mlx-lm's own sampler), ``stubborn`` (elided, on a body whose forward
gathers whatever its pipeline_size says) or ``disagree`` (the ranks name
different passes). Prints one JSON line with this rank's tokens,
what the pass did and the active memory it freed, whether revert read a
released head back bit for bit, or the error it got.
One generation per process: mlx-lm 0.32's pipelined stream_generate can leave
one rank a decode step ahead when it returns (seen unpatched as well), so a
second collective in the same process may meet the wrong partner.
"""

import json
import sys

import mlx.core as mx
import mlx_lm
from mlx.utils import tree_flatten
from mlx_lm.sample_utils import make_sampler

import graphpatch
from graphpatch.contract import rebuilt
from graphpatch.passes import elide_head
from graphpatch.passes.elide_head import pipeline

PROMPT = "Hello world! Numbers like 1234 and"

group = mx.distributed.init(backend="ring", strict=True)
model_dir, temp, mode = sys.argv[1], float(sys.argv[2]), sys.argv[3]
model, tokenizer = mlx_lm.load(model_dir)
model.model.pipeline(group)
mx.eval(model.parameters())


class Stubborn(type(model.model)):
    def __call__(self, *args, **kwargs):
        self.pipeline_size = int(self.pipeline_size)
        return super().__call__(*args, **kwargs)


if mode == "stubborn":
    model.model = rebuilt(model.model, Stubborn)


def active() -> int:
    mx.clear_cache()
    return mx.get_active_memory()


result = {"rank": group.rank()}
sampler = make_sampler(temp)
if mode == "disagree":
    try:
        graphpatch.apply(model, ["elide_head" if group.rank() == 0 else "fuse_glu"])
    except graphpatch.PassSpecError as e:
        print(json.dumps(result | {"error": str(e)}))
    sys.exit(0)
SPECS = {
    "elided": ["elide_head"],
    "gathered": ["elide_head:keep_gather"],
    "logits": ["last_token", "elide_head:logits"],
    "stubborn": ["elide_head"],
}
if mode in SPECS:
    before = active()
    report = graphpatch.apply(model, SPECS[mode], model_dir=model_dir)
    result["freed"] = before - active()
    again = graphpatch.apply(model, SPECS[mode], model_dir=model_dir)
    head, gather = report.for_pass("elide_head")
    result |= {"kind": head.kind, "status": head.status, "note": head.note}
    result["gather"] = [gather.kind, gather.status, gather.reason]
    result["again"] = [s.reason for s in again.skipped("elide_head")]
    result["again_last_token"] = [s.reason for s in again.skipped("last_token")]
    logits = model(mx.array([[1, 2, 3]]))
    result["logits"] = list(logits.shape)
    result["top"] = mx.argmax(logits[0, -1]).item()
    if mode != "logits":
        sampler = elide_head.sampler(sampler)
mx.random.seed(7)
responses = mlx_lm.stream_generate(
    model, tokenizer, PROMPT, max_tokens=8, sampler=sampler
)
result["tokens"] = [r.token for r in responses]
if "released" in (result.get("note") or ""):
    # undo reads the released head back: the checkpoint's arrays, bit for bit
    graphpatch.revert(model)
    on_disk = pipeline.head_arrays(model_dir)
    restored = dict(tree_flatten(model.lm_head.parameters()))
    result["restored"] = restored.keys() == on_disk.keys() and all(
        mx.array_equal(v, on_disk[k]).item() for k, v in restored.items()
    )
print(json.dumps(result))
