"""Which calls last_token may cut: the rule, and the marker that applies it.

The rule. The body holding the layers (``model.model``) returns only the
last ``keep`` positions of a call when all three hold:

1. the call is given a ``cache`` whose every layer is empty (a prefill:
   nothing came before it, so nothing continues it in this call);
2. the caller has said it reads only the last positions of such a call: the
   call runs inside ``prefill()`` on the caller's thread, or the pass was
   applied with ``last_token:prefill`` (every such call, undeclared);
3. the call is longer than ``max(keep, short)`` positions.

Every other call returns every position, whatever its length.

Why each condition is needed (mlx-lm 0.32.2, read from its sources):

- Calls without a cache read every position: perplexity (``eval_ppl``:
  ``model(batch[:, :-1])``), the LoRA loss (``default_loss``), a
  program's own scoring. (1) gives them every position.
- Calls continuing a cache read what they verify: decode reads one,
  speculative verification num_draft + 1 for any num_draft, evaluate's
  ``loglikelihood`` scores a completion on a copy of its prompt's cache.
  (1) gives them every position.
- An empty cache alone proves nothing: evaluate's ``loglikelihood_rolling``
  scores every position of a fresh cache (``_score_fn(batch)`` makes one),
  and speculative decoding from a one-token prompt verifies num_draft + 1
  positions against an empty cache. Such calls look exactly like a one-call
  prefill; only the caller knows which it is, so the caller says (2).
- With ``last_token:prefill`` nobody says, so (3) keeps a speculative
  verification from a one-token prompt whole up to num_draft = short - 1;
  that option is for runtimes that only generate (an exo-style one-call
  prefill) and the report warns about the two callers above.

mlx-lm's own prefills (``generate_step``, ``BatchGenerator``, the server)
never evaluate the logits of their prompt chunks, so they lose nothing.
The declaration is a thread-local: a call on another thread is not covered by
this thread's ``prefill()``. A forward traced by ``mx.compile`` keeps the
decision of its trace.
"""

import functools
import inspect
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import mlx.core as mx

_declared = threading.local()


@contextmanager
def prefill() -> Iterator[None]:
    """Declare that this thread reads only the last ``keep`` positions of the
    calls into an empty cache it makes inside the block (a prefill): last_token
    then cuts them. Nested blocks are one declaration."""
    depth = getattr(_declared, "depth", 0)
    _declared.depth = depth + 1
    try:
        yield
    finally:
        _declared.depth = depth


def declared() -> bool:
    """Whether this thread is inside ``prefill()``."""
    return getattr(_declared, "depth", 0) > 0


def is_empty(cache: Any) -> bool:
    """Whether ``cache`` is a prompt cache (one entry per layer, as
    ``make_prompt_cache`` makes) with nothing in any layer."""
    if not isinstance(cache, (list, tuple)) or not cache:
        return False
    try:
        return all(c is not None and c.empty() is True for c in cache)
    except (AttributeError, NotImplementedError, TypeError):
        return False


@functools.cache
def _signature(function: Callable[..., Any]) -> inspect.Signature:
    return inspect.signature(function)


def takes_cache(cls: type) -> bool:
    """Whether ``cls.__call__`` has a ``cache`` argument (for a class that
    ``mark`` made, its original class's)."""
    while "original" in vars(cls):  # a marker's (*args, **kwargs) hides it
        cls = vars(cls)["original"]
    return "cache" in _signature(cls.__call__).parameters


def cache_argument(
    function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """The ``cache`` a call of ``function`` (a ``__call__``, self first) was
    given, or None."""
    try:
        bound = _signature(function).bind(None, *args, **kwargs)
    except TypeError:
        return None
    return bound.arguments.get("cache")


class LastPositions:
    """The marker on the body holding the layers: its output keeps the last
    ``keep`` positions of the calls the rule lets it cut."""

    keep: int = 1
    short: int = 32
    prefill: bool = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        own = super().__call__  # type: ignore[misc]  # the body's own
        cache = cache_argument(own.__func__, args, kwargs)
        # Before the call: the call itself fills the cache.
        may_cut = (self.prefill or declared()) and is_empty(cache)
        h = own(*args, **kwargs)
        if not (may_cut and isinstance(h, mx.array) and h.ndim >= 3):
            return h
        return h[..., -self.keep :, :] if h.shape[-2] > self.longest() else h

    def longest(self) -> int:
        """The longest call into an empty cache that keeps every position."""
        return max(self.keep, self.short)
