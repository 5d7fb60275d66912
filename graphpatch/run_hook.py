"""Patch every model mlx-lm loads, in any program: what ``graphpatch run`` installs.

``install()`` runs at interpreter start, from the ``sitecustomize`` that
``graphpatch run`` puts on the child's PYTHONPATH. It waits for
``mlx_lm.utils`` to be imported, then wraps its loaders (``load``,
``load_model``, ``sharded_load``) so that each model they return is rewritten
with the env's passes (``GRAPHPATCH_PASSES``, ``GRAPHPATCH_<NAME>``): after
sharding or pipelining for distributed loads, since fusion works on the local
shards. Each report goes to stderr, one line per pass, or as a JSON line to
the file named by ``GRAPHPATCH_REPORT``. A failed check ends the program
before it can serve anything.
"""

import contextlib
import errno
import functools
import importlib.abc
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

LOADERS = ("load", "load_model", "sharded_load")
FUSED = (
    "saved with --save-format fused, which mlx-lm cannot open: open it with "
    "graphpatch.load, or save it again without --save-format"
)
CANNOT_PATCH = "graphpatch could not patch"
REPORT_NOT_WRITTEN = "GRAPHPATCH_REPORT: could not write the report to"
NO_READER = "a FIFO no process reads; the report is here instead"
NOT_EXECUTABLE = "not executable (chmod +x it, or name its interpreter first)"
DORA = (
    "DoRA cannot wrap graphpatch's fused parts (mlx-lm: {error}): train DoRA "
    "on the unpatched model, or LoRA on the patched one"
)
FUSE = (
    "mlx-lm folds an adapter into its layer's weight, and graphpatch's fused "
    "part holds none (mlx-lm: {error}): fuse the adapter into the unpatched "
    "model (mlx_lm fuse without graphpatch run), then patch what it wrote"
)
_state = threading.local()  # loader nesting depth: patch once, outermost


def install() -> None:
    """Wrap mlx-lm's loaders now, or as soon as ``mlx_lm.utils`` is imported."""
    _one_line_errors()
    if "mlx_lm.utils" in sys.modules:
        _wrap_loaders(sys.modules["mlx_lm.utils"])
    else:
        sys.meta_path.insert(0, _AfterImport())


def _one_line_errors() -> None:
    """A refusal graphpatch raises while the program runs (training a joined
    layer) ends it as graphpatch's commands end: one line, exit 2. So does
    mlx-lm's refusal to wrap a fused part in DoRA, at the start of training,
    and its fuse reaching for a fused part's weight."""
    previous = sys.excepthook

    def hook(kind, error, traceback) -> None:
        contract = sys.modules.get("graphpatch.contract")  # none: not graphpatch's
        if contract and isinstance(error, contract.GraphpatchError):
            _die(str(error), 2)
        if contract and isinstance(error, ValueError) and "FusedPart" in str(error):
            _die(DORA.format(error=error), 2)
        part = "'FusedPart' object has no attribute"
        if contract and isinstance(error, AttributeError) and part in str(error):
            _die(FUSE.format(error=error), 2)
        previous(kind, error, traceback)

    sys.excepthook = hook


class _AfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "mlx_lm.utils":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_and_wrap(module):
            exec_module(module)
            _wrap_loaders(module)

        spec.loader.exec_module = exec_and_wrap
        return spec


def _wrap_loaders(utils) -> None:
    for name in LOADERS:
        loader = getattr(utils, name, None)
        if loader is not None and not hasattr(loader, "graphpatch_wrapped"):
            setattr(utils, name, _wrap(loader))


def _wrap(loader):
    @functools.wraps(loader)
    def load_and_patch(path_or_repo, *args, **kwargs):
        if loader.__name__ == "sharded_load" and _graphpatch_shards(args, kwargs):
            return _sharded(path_or_repo, *args, **kwargs)
        _state.depth = getattr(_state, "depth", 0) + 1
        try:
            result = loader(path_or_repo, *args, **kwargs)
        except ValueError:
            from graphpatch.outdir import saved_format

            if saved_format(path_or_repo) == "fused":
                _loaded_one()
                _stop(f"{path_or_repo}: {FUSED}", code=2)
            raise
        finally:
            _state.depth -= 1
        if _state.depth == 0:
            _patch(result[0], path_or_repo, _adapter_path(loader, args, kwargs))
        return result

    load_and_patch.graphpatch_wrapped = loader
    return load_and_patch


def _graphpatch_shards(args: tuple, kwargs: dict) -> bool:
    """A tensor-parallel ``sharded_load`` (no pipeline group) with a pass of
    graphpatch's that shards the model itself (``Pass.tensor_parallel``):
    mlx-lm's own ``shard()`` exists for a few architectures only. Such a pass
    shards over the world group, so a smaller tensor group is left to
    mlx-lm's loader."""
    import mlx.core as mx

    from graphpatch import plan

    if kwargs.get("pipeline_group", args[0] if args else None) is not None:
        return False
    tensor_group = kwargs.get("tensor_group", args[1] if len(args) > 1 else None)
    if tensor_group is not None and tensor_group.size() != mx.distributed.init().size():
        return False
    return any(p.tensor_parallel for p, _ in plan.resolve(None)[0])


def _sharded(
    repo,
    pipeline_group=None,
    tensor_group=None,
    return_config: bool = False,
    *,
    tokenizer_config=None,
    trust_remote_code: bool = False,
):
    """mlx-lm's ``sharded_load`` with graphpatch sharding: the model loaded
    lazily, patched (sharded) before its weights are read, then evaluated one
    array at a time, so no rank holds more than its part and one array."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    utils = sys.modules["mlx_lm.utils"]
    model_path = utils._download(repo)
    _state.depth = getattr(_state, "depth", 0) + 1  # patched here, not inside
    try:
        model, config = utils.load_model(
            model_path, lazy=True, strict=False, trust_remote_code=trust_remote_code
        )
    finally:
        _state.depth -= 1
    tokenizer = utils.load_tokenizer(
        model_path,
        tokenizer_config or {"trust_remote_code": True},
        eos_token_ids=config.get("eos_token_id", None),
    )
    _patch(model, repo)
    for _, array in tree_flatten(model.parameters()):
        mx.eval(array)
    mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu))  # in step
    return (model, tokenizer, config) if return_config else (model, tokenizer)


def _adapter_path(loader, args: tuple, kwargs: dict) -> str | None:
    """The ``adapter_path`` the program passed to mlx-lm's ``load``, if any."""
    import inspect  # here, not at every interpreter start

    try:
        bound = inspect.signature(loader).bind(None, *args, **kwargs)
    except (TypeError, ValueError):
        return None
    return bound.arguments.get("adapter_path")


def _patch(model, path_or_repo, adapter_path: str | None = None) -> None:
    import graphpatch
    from graphpatch import trust
    from graphpatch.report import printable

    _loaded_one()
    mode = os.environ.get("GRAPHPATCH_VERIFY", "cached")
    try:
        model_dir = _local(path_or_repo)
        say = _progress(path_or_repo)
        if model_dir.is_dir():
            passes = _passes(model_dir)
            report = trust.apply(
                model, passes, model_dir, mode, say, adapter_path=adapter_path
            )
        else:
            report = graphpatch.apply(model, verify=mode != "never", progress=say)
        trust.settle(model, report)  # the program may run it on another thread
    except graphpatch.VerificationError as e:
        if e.report is not None:
            _emit(e.report, path_or_repo)
        _stop(f"verification failed, stopping: {e}")
    except graphpatch.GraphpatchError as e:
        _stop(str(e), code=2)  # bad input, as graphpatch apply exits
    except Exception as e:  # graphpatch's own fault, never the program's or mlx-lm's
        _stop(f"{CANNOT_PATCH} {path_or_repo}: {type(e).__name__}: {printable(e)}")
    _emit(report, path_or_repo)


def _local(path_or_repo) -> Path:
    """The directory mlx-lm loaded: a repo id's snapshot in the cache."""
    from graphpatch.checks import LoadError
    from graphpatch.loading import model_path

    try:
        return model_path(path_or_repo)
    except LoadError:
        return Path(path_or_repo)


def _loaded_one() -> None:
    """Tell graphpatch run that the program loaded (or tried to load) a model."""
    run_dir = os.environ.get("GRAPHPATCH_RUN_DIR")
    if run_dir and os.path.isdir(run_dir):
        Path(run_dir, f"{os.getpid()}-{threading.get_ident()}").touch()


def _passes(model_dir: Path) -> list[str] | None:
    """The env's passes; where it names none, those a plain save recorded."""
    from graphpatch import opening, plan
    from graphpatch.outdir import saved_format

    if saved_format(model_dir) != "plain" or plan.resolve(None)[0]:
        return None
    config = json.loads((model_dir / "config.json").read_text())
    return opening.recorded(model_dir, config)


def _progress(model) -> Callable[[str], None]:
    """Progress lines on stderr, at most one a second (and every model check),
    so that a long apply is never silent."""
    last = -1.0

    def say(line: str) -> None:
        nonlocal last
        if time.monotonic() - last >= 1.0 or line.endswith("checking the model"):
            last = time.monotonic()
            _tell(f"{_prefix()}: {model}: {line}")

    return say


def _prefix() -> str:
    rank = os.environ.get("MLX_RANK")
    return "graphpatch" if rank is None else f"graphpatch[rank {rank}]"


def _emit(report, model: str) -> None:
    target = os.environ.get("GRAPHPATCH_REPORT")
    if target:
        rank = os.environ.get("MLX_RANK")
        report.model, report.rank = str(model), None if rank is None else int(rank)
        why = _append(target, json.dumps(report.to_dict()) + "\n")
        if why is None:
            return
        report.warnings.append(f"{REPORT_NOT_WRITTEN} {target} ({why})")
    lines = [f"{model}: {line}" for line in report.summary_lines()]
    lines += [f"{model}: {report.record}"] if report.record else []
    lines += [f"  skipped {line}" for line in report.skipped_lines()]
    lines += [f"  warning: {warning}" for warning in report.warnings]
    for line in lines or [f"{model}: no passes chosen"]:
        _tell(f"{_prefix()}: {line}")


def _append(target: str, line: str) -> str | None:
    """Append ``line`` to ``target``; return why it could not be, or None.
    Opened without blocking: a FIFO no process reads would wait forever."""
    try:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK
        fd = os.open(target, flags, 0o666)
    except OSError as e:
        return NO_READER if e.errno == errno.ENXIO else e.strerror
    try:
        os.set_blocking(fd, True)  # a reader is there: let it take its time
        with os.fdopen(fd, "w") as f:
            f.write(line)
    except OSError as e:
        return e.strerror
    return None


def _tell(line: str) -> None:
    """One line on stderr; none where the program closed it or its reader is
    gone (a daemon, ``2>&1 | head``): graphpatch's words never stop a load."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # ValueError: sys.stderr itself closed
        pass


# Set once a server has loaded its own model and answers requests: a model a
# request names that cannot be patched is refused to that request alone.
_answering = threading.Event()


def answering_requests() -> None:
    """From now on, a model that cannot be patched raises to its caller (a
    server's request, which mlx-lm answers with an error) instead of ending
    the process: the model the server was started with passed already."""
    _answering.set()


def _stop(message: str, code: int = 1) -> None:
    """End the program before it can use a model that failed (``_die``); in a
    server answering requests, refuse the request's model instead."""
    if _answering.is_set():
        from graphpatch.contract import GraphpatchError

        _tell(f"{_prefix()}: error: {' '.join(message.split())}")
        raise GraphpatchError(message)
    _die(message, code)


def _die(message: str, code: int = 1) -> None:
    _tell(f"{_prefix()}: error: {' '.join(message.split())}")
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
    os._exit(code)  # also from a server's loader thread: nothing may be served


class CannotRun(Exception):
    """The command exists but cannot be started (what a shell exits 126 for)."""


def _start(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    try:
        return subprocess.Popen(command, env=env)
    except OSError as e:
        if e.errno == errno.ENOEXEC:
            why = "not a program: no #! line and not a binary this system runs"
        elif e.errno == errno.ENOENT:
            why = "its #! interpreter was not found"
        elif e.errno == errno.EACCES:
            why = NOT_EXECUTABLE
        else:
            why = e.strerror or str(e)
        raise CannotRun(f"cannot run {command[0]}: {why}") from None


def run(command: list[str], env: dict[str, str], startup: str) -> int:
    """Run ``command`` with the hook on its PYTHONPATH (and its children's),
    wait, and return its exit code; say so when no process loaded a model.
    SIGINT, SIGTERM and SIGHUP sent to graphpatch are passed on.

    Raises:
        CannotRun: the command exists but could not be started.
    """
    with tempfile.TemporaryDirectory(prefix="graphpatch-run-") as run_dir:
        env = {**env, "GRAPHPATCH_RUN_DIR": run_dir}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (startup, env.get("PYTHONPATH")) if p
        )
        child = _start(command, env)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda number, frame: child.send_signal(number))
        code = child.wait()
        if not os.listdir(run_dir):
            print(
                "graphpatch: the program loaded no model through mlx-lm "
                "before it ended; nothing was patched (a process it left "
                "running is patched when it loads one)",
                file=sys.stderr,
                flush=True,
            )
    return 128 - code if code < 0 else code
