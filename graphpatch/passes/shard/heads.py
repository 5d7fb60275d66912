"""Head counts of an attention block: which attributes its ``__call__`` reads
as counts, what they are, and what each rank's become.

Counts are the block's integer attributes named as head counts (``n_heads``,
``num_key_value_heads``, ``k_num_heads``) or as their ratio (``repeats``,
``n_kv_groups``, ``num_key_value_groups``); widths (``head_dim``,
``hidden_size``) are no counts. Their values must agree with the projections'
shapes, and the site check proves the result.
"""

from dataclasses import dataclass

import mlx.nn as nn

from graphpatch.passes.shard.split import Ranges, even

RATIO_WORDS = ("group", "repeat", "per_kv")
KV_WORDS = ("kv", "key")

NO_HEAD_COUNT = "no attribute holds its head count (a count the pass cannot see)"
COUNTS_DISAGREE = "its {kind} head counts disagree ({values})"
HEADS_NOT_DIVISIBLE = "{heads} heads not divisible by {n} ranks"
KV_NOT_SPLIT = (
    "{kv} kv heads over {n} ranks: neither divisible nor a divisor to replicate"
)
RATIO_UNKNOWN = "{name} = {value} is not its q heads per kv head ({ratio})"


@dataclass
class Heads:
    q: int  # query heads
    kv: int  # key/value heads
    names: dict[str, str]  # attribute -> q, kv or ratio


def count_kind(name: str) -> str | None:
    """``q``, ``kv`` or ``ratio`` for an attribute named as a count, else None."""
    word = name.lower()
    if "dim" in word or "size" in word or word.startswith("_"):
        return None
    if any(w in word for w in RATIO_WORDS):
        return "ratio"
    if "head" not in word:
        return None
    if any(w in word for w in KV_WORDS) or word.startswith(("k_", "v_")):
        return "kv"
    return "q"


def find_heads(module: nn.Module) -> Heads | str:
    """The block's head counts, or the reason they cannot be told."""
    names: dict[str, str] = {}
    values: dict[str, set[int]] = {"q": set(), "kv": set(), "ratio": set()}
    for name, value in vars(module).items():
        if type(value) is not int or not (kind := count_kind(name)):
            continue
        names[name] = kind
        values[kind].add(value)
    for kind in ("q", "kv"):
        if len(values[kind]) > 1:
            return COUNTS_DISAGREE.format(kind=kind, values=sorted(values[kind]))
    if not values["q"]:
        return NO_HEAD_COUNT
    q = values["q"].pop()
    kv = values["kv"].pop() if values["kv"] else q
    for name, kind in names.items():
        value = vars(module)[name]
        if kind == "ratio" and (kv == 0 or value != q // kv):
            return RATIO_UNKNOWN.format(name=name, value=value, ratio=q // max(kv, 1))
    return Heads(q, kv, names)


def kv_heads(heads: Heads, n: int) -> list[Ranges] | str:
    """Each rank's kv heads: an even split, or the one kv head a rank's q
    heads read when there are fewer kv heads than ranks (replicated)."""
    if heads.kv % n == 0:
        return even(heads.kv, n)
    if n % heads.kv == 0:
        return [[(r * heads.kv // n, r * heads.kv // n + 1)] for r in range(n)]
    return KV_NOT_SPLIT.format(kv=heads.kv, n=n)


def local_counts(module: nn.Module, heads: Heads, n: int) -> dict[str, int]:
    """What each count attribute becomes on every rank."""
    q = heads.q // n
    kv = max(heads.kv // n, 1)
    new = {"q": q, "kv": kv, "ratio": q // kv}
    return {name: new[kind] for name, kind in heads.names.items()}


def scaled(ranges: list[Ranges], width: int, offset: int = 0) -> list[Ranges]:
    """Ranges of heads as ranges of rows, ``width`` rows a head."""
    return [[(offset + a * width, offset + b * width) for a, b in r] for r in ranges]
