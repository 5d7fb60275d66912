"""The passes, in the one canonical order the manager runs them in."""

from graphpatch.passes import elide_head, fuse_glu, last_token, untied_head

PASSES = {
    p.name: p
    for p in (untied_head.PASS, fuse_glu.PASS, last_token.PASS, elide_head.PASS)
}
