"""What stands in the tree after a fusion: one fused matmul serving a
module's parts (``FusedCall``, ``FusedPart``), the marker on the joined layer,
and the stream they are built on.
"""

import functools
import threading
import weakref
from collections.abc import Iterable

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear

from graphpatch.contract import GraphpatchError

# Adapters whose __call__ runs their base, self.linear(x), on the very input
# they were given and add a delta of their own (DoRA's reads the base's
# weight instead, and is not one).
ADAPTERS = (LoRALinear, LoRASwitchLinear)


@functools.cache
def _any_thread_stream(device: str) -> mx.Stream:
    # ``device`` (the default device's name) only keys the cache: one stream
    # per device, made once, since each holds a worker thread for good.
    return mx.new_thread_unsafe_stream(mx.default_device())


def any_thread() -> mx.Stream:
    """The stream an unverified apply builds joined arrays on: it leaves them
    unevaluated, and a program may first run the model on another thread
    (mlx-lm's server), where MLX cannot evaluate an array built on a stream
    of this thread ("no Stream(cpu, 0) in current thread"). A verified apply
    evaluates them at once, on this thread's own stream."""
    return _any_thread_stream(str(mx.default_device()))


class FusedCall:
    """The one fused matmul behind a module's parts.

    The first part called computes ``owner.<fused>`` once and keeps the other
    parts until their siblings ask for them with the very same arguments; any
    other call computes its own fused matmul, so a ``__call__`` that feeds the
    parts different inputs stays correct, only slower. What is kept is each
    thread's own, so threads running the model at once never meet. The owner
    is looked up on each call, so a later ``nn.quantize`` of the fused layer
    is honoured.
    """

    def __init__(self, owner: nn.Module, fused: str, sizes: list[int]):
        self.owner = weakref.ref(owner)
        self.fused = fused
        self.sizes = sizes  # each part's output rows, in order
        self.cuts = [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)]
        self.threads = threading.local()  # .pending of each thread
        self.settled = False  # the joined arrays are evaluated
        self.settling = threading.Lock()

    @property
    def pending(self) -> tuple[tuple, dict, dict[int, mx.array]] | None:
        """(args, kwargs, {index: output}) of this thread's last call, until
        all its parts are taken."""
        return getattr(self.threads, "pending", None)

    @pending.setter
    def pending(self, value) -> None:
        self.threads.pending = value

    def settle(self, owner: nn.Module) -> None:
        """Evaluate the joined layer's arrays once, on the first call from
        any thread: an unverified apply leaves them a graph on a stream any
        thread may evaluate, but not several threads at once."""
        with self.settling:
            if self.settled:
                return
            try:
                mx.eval(owner[self.fused].parameters())
            except ValueError:
                return  # traced by mx.compile: the trace evaluates them
            self.settled = True

    def bounds(self, index: int) -> tuple[int, int]:
        start = sum(self.sizes[:index])
        return start, start + self.sizes[index]

    def part(self, index: int, args: tuple, kwargs: dict) -> mx.array:
        if self.pending is not None and _same_call(self.pending, args, kwargs):
            outputs = self.pending[2]
            if index in outputs:
                out = outputs.pop(index)
                if not outputs:
                    self.pending = None
                return out
        owner = self.owner()
        assert owner is not None, "a fused part outlived its module"
        if not self.settled:
            self.settle(owner)
        out = owner[self.fused](*args, **kwargs)
        parts = dict(enumerate(mx.split(out, self.cuts, axis=-1)))
        mine = parts.pop(index)
        self.pending = (args, kwargs, parts)
        return mine


def _same_call(pending: tuple, args: tuple, kwargs: dict) -> bool:
    old_args, old_kwargs, _ = pending
    return (
        len(args) == len(old_args)
        and all(a is b for a, b in zip(args, old_args, strict=True))
        and old_kwargs.keys() == kwargs.keys()
        and all(old_kwargs[k] is v for k, v in kwargs.items())
    )


class FusedPart(nn.Module):
    """Stands where one of the fused projections stood (``index`` in order)."""

    def __init__(self, call: FusedCall, index: int):
        super().__init__()
        self.call = call
        self.index = index
        # mlx's leaf_modules takes a module as a leaf when nothing is found
        # below its children, and this part holds no array: a LoRA over it
        # would be a leaf, its adapter counted as base parameters in mlx-lm's
        # trainable-parameter line. One entry that is no parameter (a string
        # in the module's dict) keeps the LoRA a parent, as over a Linear.
        self["part_of"] = call.fused

    def __call__(self, *args, **kwargs) -> mx.array:
        return self.call.part(self.index, args, kwargs)

    def to_lora(self, r: int, scale: float, dropout: float) -> nn.Module:
        """mlx-lm's LoRA on this part (``linear_to_lora_layers`` asks): the
        adapter the unpatched projection would get, with this part as its
        base, so its keys and its initial values are the unpatched ones."""
        owner = self.call.owner()
        assert owner is not None, "a fused part outlived its module"
        joined = owner[self.call.fused]
        in_dims = joined.weight.shape[-1]
        if "scales" in joined:
            in_dims = in_dims * 32 // joined.bits
        out_dims = self.call.sizes[self.index]
        if joined.weight.ndim == 3:  # experts
            experts = joined.weight.shape[0]
            adapter = LoRASwitchLinear(in_dims, out_dims, experts, r, dropout, scale)
        else:
            adapter = LoRALinear(in_dims, out_dims, r, dropout, scale)
        adapter.linear = self
        return adapter


TRAINING_REFUSED = (
    "training {fused} (graphpatch's joined layer) is refused: mlx-lm's full "
    "fine-tune and DWQ would save its arrays under a name an unpatched model "
    "does not load; train the unpatched model, or LoRA adapters (each part "
    "gets the adapter the unpatched projection would)"
)


class TrainingRefused(GraphpatchError):
    """Something began to train a joined layer."""


class Pinned(set[str]):
    """A joined layer's frozen parameter names. Unfreezing any of them (what
    mlx-lm's full fine-tune and DWQ do, at their start) is refused: their
    arrays would be trained and saved under the fused name, which no
    unpatched model loads, and mlx-lm loads such a file without a word
    (``strict=False``). Freezing, and reading, are as a set's."""

    def __init__(self, names: set[str], fused: str):
        super().__init__(names)
        self.fused = fused

    def _refuse(self, names: set[str]) -> None:
        if names & self:
            raise TrainingRefused(TRAINING_REFUSED.format(fused=self.fused))

    def clear(self) -> None:
        self._refuse(set(self))

    def difference_update(self, *others: Iterable[object]) -> None:
        names = [list(names) for names in others]  # iterators are read once
        self._refuse({str(name) for some in names for name in some})
        super().difference_update(*names)

    def discard(self, name: object) -> None:
        self._refuse({str(name)})

    def remove(self, name: object) -> None:
        self._refuse({str(name)})
        super().remove(str(name))


class Joined:
    """Marks the layer ``fuse`` puts under the fused name: mlx-lm's LoRA
    leaves it as it is, since its parts get the adapters."""

    def to_lora(self, r: int, scale: float, dropout: float) -> nn.Module:
        return self  # type: ignore[return-value]
