"""graphpatch serve: mlx-lm's own server, its model loaded, patched and verified
before the port opens.

mlx-lm's server loads its model on the first request, so a bad checkpoint or
a failed check would show only then, behind an open port. Here the loader
hook (``graphpatch.run_hook``) is installed in this process, and the server's
``run`` first loads the default model; every other flag is mlx-lm's own.
"""

import io
import os
import socket
import sys
from pathlib import Path

from graphpatch.contract import GraphpatchError


class ServeError(GraphpatchError):
    """An address the server cannot listen on, or a model it cannot load."""


def check_address(host: str, port: int) -> None:
    """Raise ServeError unless the server can listen on ``host:port`` now."""
    if not 1 <= port <= 65535:
        raise ServeError(f"--port {port}: a port is a number from 1 to 65535")
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (socket.gaierror, UnicodeError) as e:
        raise ServeError(f"--host {host}: not an address to listen on ({e})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise ServeError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def _exit(message: str) -> None:
    """One line, then end the process now: mlx-lm's run has started its
    generation thread, which would keep a normal exit waiting forever."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(2)


def serve(model_dir: Path, host: str, port: int, passes: str, flags: list[str]) -> None:
    """Run ``mlx_lm server`` here with the model loaded (and patched) first.

    Raises:
        ServeError: the model could not be loaded; nothing was listening.
    """
    from graphpatch import run_hook

    if passes:
        os.environ["GRAPHPATCH_PASSES"] = passes
    run_hook.install()  # before mlx_lm.server binds mlx_lm.utils.load
    import mlx_lm.server as server

    run = server.run
    said, original = io.StringIO(), sys.stderr  # said: mlx-lm's parser's words

    def run_loaded(host, port, model_provider, *args, **kwargs):
        sys.stderr = original  # the flags parsed: mlx-lm speaks for itself
        sys.stderr.write(said.getvalue())
        try:
            model_provider.load_default()
        except Exception as e:
            reason = f"{type(e).__name__}: {e}".splitlines()[0]
            raise ServeError(
                f"{model_dir}: mlx-lm could not load it ({reason})"
            ) from None
        run_hook.answering_requests()
        try:
            return run(host, port, model_provider, *args, **kwargs)
        except OSError as e:  # the port was free when checked, taken since
            _exit(f"cannot listen on {host}:{port}: {e.strerror}")

    server.run = run_loaded  # this process is the server: nothing else sees it
    sys.argv = ["mlx_lm.server", "--model", str(model_dir)]
    sys.argv += ["--host", host, "--port", str(port), *flags]
    sys.stderr = said
    try:
        server.main()
    except SystemExit as e:
        refused = sys.stderr is said and e.code not in (0, None)
        sys.stderr = original
        if refused:  # mlx-lm's parser refused a flag
            lines = said.getvalue().strip().splitlines() or [f"exit {e.code}"]
            raise ServeError(lines[-1].removeprefix("mlx_lm.server: error: ")) from None
        raise
