"""The passes, in the one canonical order the manager runs them in."""

from graphpatch.passes import (
    elide_head,
    fuse_glu,
    fuse_qkv,
    last_token,
    shard,
    untied_head,
)

# fuse_glu and fuse_qkv touch disjoint modules (an MLP's, an attention's) and
# run before the head passes, which wrap a head neither touches.
ORDER = (untied_head, shard, fuse_glu, fuse_qkv, last_token, elide_head)
PASSES = {module.PASS.name: module.PASS for module in ORDER}
