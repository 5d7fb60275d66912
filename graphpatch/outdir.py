"""Where a save may write, and how it replaces an earlier save atomically.

graphpatch never deletes or overwrites a directory it did not write. OUT may
be replaced only when it is an earlier graphpatch save (its config.json says
so), and never when it is the source checkpoint, holds it, or lies inside it.

A save is written to a marked directory beside OUT, ``.OUT.graphpatch-new-PID``.
A replace then renames the old OUT to ``.OUT.graphpatch-old-PID``, renames the
new one in and deletes the old, so at every instant one complete model stands
under OUT's name or under that aside name. ``recover`` finishes or undoes what
a killed save left, matching those exact names only.
"""

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from graphpatch.contract import GraphpatchError

MARKER = ".graphpatch-partial"  # written first into every directory we write
NEW, OLD = "new", "old"


class SaveError(GraphpatchError):
    """A model or an OUT that cannot be saved; nothing was written."""


# A fused save's model_type: mlx-lm refuses it with this text as the reason.
MODEL_TYPE = (
    "graphpatch-fused (saved with --save-format fused; open it with "
    "graphpatch.load or graphpatch apply, or save it again without that option)"
)


def format_of(config: dict) -> str | None:
    """``fused`` or ``plain`` for the config of a directory graphpatch save
    wrote, else None: a fused save is known by its model_type, a plain one by
    its ``graphpatch`` section."""
    if not isinstance(config, dict):
        return None
    if config.get("model_type") == MODEL_TYPE:
        return "fused"
    return "plain" if isinstance(config.get("graphpatch"), dict) else None


def saved_format(path: str | Path) -> str | None:
    """``format_of`` the config.json in ``path`` (None when it has none)."""
    try:
        return format_of(json.loads(Path(path, "config.json").read_text()))
    except (OSError, ValueError):
        return None


def is_save(path: Path) -> bool:
    """Whether ``path`` is a directory written by graphpatch save."""
    return saved_format(path) is not None


def _within(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def check_out(source_dir: Path, out: Path, force: bool) -> None:
    """Refuse an OUT that a save must not write or replace.

    Raises:
        SaveError: the reason, in one line.
    """
    source, target = Path(source_dir).resolve(), Path(out).resolve()
    if _within(source, target):
        raise SaveError(f"--save {out} is the source model or holds it: refused")
    if _within(target, source):
        raise SaveError(f"--save {out} lies inside the source model {source_dir}")
    if out.is_symlink():
        raise SaveError(f"--save {out} is a symlink: refused, name a new directory")
    if not out.exists():
        return
    if not out.is_dir():
        raise SaveError(f"--save {out} exists and is not a directory: refused")
    if not is_save(out):
        raise SaveError(
            f"--save {out} exists and was not written by graphpatch: it is never "
            "replaced; name a new directory"
        )
    if not force:
        raise SaveError(
            f"--save {out} is an earlier graphpatch save (--force replaces it)"
        )


def check_room(source_dir: Path, out: Path) -> None:
    """Refuse before any work when OUT's place cannot be written or has less
    free space than the source's weights (a patched model takes as much).

    Raises:
        SaveError: the reason, in one line.
    """
    place = next((p for p in out.absolute().parents if p.exists()), Path("/"))
    probe = place / f".{out.name}.graphpatch-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
        free = shutil.disk_usage(place).free
    except OSError as e:
        raise SaveError(f"cannot write {out}: {e.strerror}") from None
    needed = sum(f.stat().st_size for f in Path(source_dir).glob("*.safetensors"))
    if needed > free:
        raise SaveError(
            f"cannot write {out}: No space left ({needed >> 20} MiB needed, "
            f"{free >> 20} MiB free at {place})"
        )


def _leftovers(out: Path) -> list[tuple[str, Path]]:
    """(role, path) of what killed saves of OUT left: exact names, dead pids."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.graphpatch-({NEW}|{OLD})-(\d+)")
    found = []
    for entry in out.parent.iterdir() if out.parent.is_dir() else []:
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink():
            if not _alive(int(match.group(2))):
                found.append((match.group(1), entry))
    return found


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a dead process's pid, reused by us
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(out: Path) -> list[str]:
    """Finish or undo what interrupted saves of ``out`` left; say what was done.

    An old save set aside with no OUT in its place is renamed back; with a
    complete OUT it is deleted. Marked, unfinished new saves are deleted.
    """
    done = []
    for role, path in sorted(_leftovers(out), key=lambda item: item[0] == NEW):
        if role == OLD and is_save(path) and not out.exists():
            path.rename(out)
            done.append(f"restored {out} from {path.name}, left by a killed replace")
        elif role == OLD and is_save(path) and is_save(out):
            shutil.rmtree(path)
            done.append(f"removed {path.name}, the old save a killed replace left")
        elif role == NEW and (path / MARKER).is_file():
            shutil.rmtree(path)
            done.append(f"removed {path.name}, a save that was killed while writing")
    return done


def write_atomically(
    out: Path, write: Callable[[Path], None], progress: Callable[[str], None]
) -> None:
    """Have ``write`` fill a new directory, then put it in OUT's place."""
    tmp = out.parent / f".{out.name}.graphpatch-{NEW}-{os.getpid()}"
    aside = out.parent / f".{out.name}.graphpatch-{OLD}-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        (tmp / MARKER).write_text(json.dumps({"out": out.name}))
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        progress(f"moving the old {out.name} aside to {aside.name}")
        out.rename(aside)
    progress(f"moving the new save in as {out.name}")
    try:
        tmp.rename(out)
    except BaseException:
        if aside.exists() and not out.exists():
            aside.rename(out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (out / MARKER).unlink()
    if aside.exists():
        progress(f"removing the old save {aside.name}")
        shutil.rmtree(aside)
