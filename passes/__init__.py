"""The passes, in the one canonical order the manager runs them in."""

from graphpatch.passes import fuse_glu

PASSES = {p.name: p for p in (fuse_glu.PASS,)}
