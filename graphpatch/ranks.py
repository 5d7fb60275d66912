"""Decisions every rank of the distributed group takes alike: probes and
checks run collectives, so a rank that decided otherwise would wait forever
for the others.
"""

import zlib

import mlx.core as mx

from graphpatch.contract import PassSpecError


def agree(plan) -> None:
    """Ranks of a distributed group must run the same passes: probes and
    checks run collectives, and a rank that ran other ones would hang."""
    group = mx.distributed.init()
    if group.size() == 1:
        return
    spec = ",".join(f"{p.name}{sorted(o.items())}" for p, o in plan) or "none"
    mine = mx.array([zlib.crc32(spec.encode())], mx.uint32)
    every = mx.distributed.all_gather(mine, group=group).tolist()
    if len(set(every)) > 1:
        raise PassSpecError(
            f"the {group.size()} ranks disagree on the passes (rank "
            f"{group.rank()} has {spec}); every rank must apply the same"
        )


def anywhere(happened: bool) -> bool:
    """Whether ``happened`` holds on some rank of the global group."""
    return not everywhere(not happened)


def everywhere(ok: bool) -> bool:
    """Whether ``ok`` holds on every rank of the global group."""
    group = mx.distributed.init()
    if group.size() == 1:
        return ok
    failed = mx.distributed.all_sum(mx.array(0 if ok else 1), group=group)
    return failed.item() == 0


def same_everywhere(text: str) -> bool:
    """Whether every rank of the global group holds the same ``text``."""
    group = mx.distributed.init()
    if group.size() == 1:
        return True
    mine = mx.array([zlib.crc32(text.encode())], mx.uint32)
    return len(set(mx.distributed.all_gather(mine, group=group).tolist())) == 1
