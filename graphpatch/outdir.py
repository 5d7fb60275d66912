"""Where a save may write, and how it replaces an earlier save atomically.

graphpatch never deletes or overwrites a file it did not write. OUT may be
replaced only when its manifest (``manifest``) proves that every entry in it
is a file graphpatch wrote, unchanged. A ``graphpatch`` key in config.json
proves nothing (mlx-lm's convert copies it), and a save without a manifest (an
older graphpatch's) is never replaced. OUT is never the source checkpoint,
what holds it or lies inside it, nor the current directory or what holds it.

A save is written to a marked directory beside OUT, ``.graphpatch-new-PID-TAG``
(TAG: a short hash of OUT's name, so that a 255-byte name still fits; the
marker records the name itself). Under a lock beside OUT, the replace checks
OUT again, renames the old OUT to ``.graphpatch-old-PID-TAG``, renames the new
one in and deletes the old, so at every instant one complete model stands
under OUT's name or under that aside name, and of two saves racing for OUT
one refuses. ``recover`` finishes or undoes what a killed save left, matching
those exact names only, and deletes only what is proven to be graphpatch's.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from graphpatch.contract import GraphpatchError
from graphpatch.manifest import MANIFEST, MARKER, unproven
from graphpatch.report import printable

NEW, OLD = "new", "old"
SHOWN = 5  # entries named in a refusal


class SaveError(GraphpatchError):
    """A model or an OUT that cannot be saved; nothing was written."""


def refused(message: str) -> SaveError:
    """A refusal of ``out``, whose message names it first."""
    return SaveError(message, argument="out")


# A fused save's model_type: mlx-lm refuses it with this text as the reason.
MODEL_TYPE = (
    "graphpatch-fused (saved with --save-format fused; open it with "
    "graphpatch.load or graphpatch apply, or save it again without that option)"
)
NOT_OURS = (
    "out {out} exists and was not written by graphpatch: it is never "
    "replaced; name a new directory"
)
NO_MANIFEST = (
    "out {out} has no {manifest} (a save by an older graphpatch, or a copy "
    "made by another tool), so graphpatch cannot prove it wrote it: it is "
    "never replaced; remove it yourself or name a new directory"
)
IN_THE_WAY = "out {out} holds {names}, which graphpatch did not write: refused"
EARLIER = "out {out} is an earlier graphpatch save (force replaces it)"
HOLDS_CWD = (
    "out {out} is the current directory or holds it: replacing it would "
    "pull it out from under this process; run from outside it"
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
    """Whether ``path`` looks like a directory written by graphpatch save (its
    config says so; ``unproven`` says whether it really is)."""
    return saved_format(path) is not None


def _shown(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(printable(n, 80) for n in names[:SHOWN]) + more


def _within(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def check_out(source_dir: Path, out: Path, force: bool) -> None:
    """Refuse an OUT that a save must not write or replace.

    Raises:
        SaveError: the reason, in one line.
    """
    source, target = Path(source_dir).resolve(), Path(out).resolve()
    if _within(source, target):
        raise refused(f"out {out} is the source model or holds it: refused")
    if _within(target, source):
        raise refused(f"out {out} lies inside the source model {source_dir}")
    if out.is_symlink():
        raise refused(f"out {out} is a symlink: refused, name a new directory")
    if not out.exists():
        return
    if not out.is_dir():
        raise refused(f"out {out} exists and is not a directory: refused")
    with contextlib.suppress(OSError):  # a removed cwd holds nothing
        if _within(Path.cwd().resolve(), target):
            raise refused(HOLDS_CWD.format(out=out))
    in_the_way = unproven(out)
    if in_the_way is None:
        template = NO_MANIFEST if is_save(out) else NOT_OURS
        raise refused(template.format(out=out, manifest=MANIFEST))
    if in_the_way:
        raise refused(IN_THE_WAY.format(out=out, names=_shown(in_the_way)))
    if not force:
        raise refused(EARLIER.format(out=out))


def tag(out: Path) -> str:
    """A short stand-in for OUT's name in the names beside it."""
    return hashlib.sha256(out.name.encode()).hexdigest()[:12]


def check_room(out: Path, needed: int) -> None:
    """Refuse before any work when OUT's place cannot be written or has less
    free space than ``needed`` bytes.

    Raises:
        SaveError: the reason, in one line.
    """
    place = next((p for p in out.absolute().parents if p.exists()), Path("/"))
    probe = place / f".graphpatch-probe-{os.getpid()}-{tag(out)}"
    try:
        probe.mkdir()
        probe.rmdir()
        free = shutil.disk_usage(place).free
    except OSError as e:
        raise SaveError(f"cannot write {out}: {e.strerror}") from None
    if needed > free:
        raise SaveError(
            f"cannot write {out}: No space left ({needed >> 20} MiB needed, "
            f"{free >> 20} MiB free at {place})"
        )


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the lock of OUT's name (a file beside it, removed on release).

    Raises:
        SaveError: the lock cannot be created (OUT's place is not writable).
    """
    path = out.parent / f".graphpatch-lock-{tag(out)}"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise SaveError(f"cannot write {out}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                break  # else its holder removed it while we waited: again
        except FileNotFoundError:
            pass
        except OSError as e:  # a file system without locks
            os.close(fd)
            raise SaveError(f"cannot lock {path}: {e.strerror}") from None
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _leftovers(out: Path) -> list[tuple[str, Path]]:
    """(role, path) of what killed saves of OUT left: exact names, dead pids
    (an older graphpatch's ``.OUT.graphpatch-new-PID`` too)."""
    roles = f"({NEW}|{OLD})"
    patterns = [
        re.compile(rf"\.graphpatch-{roles}-(\d+)-{tag(out)}"),
        re.compile(rf"\.{re.escape(out.name)}\.graphpatch-{roles}-(\d+)"),
    ]
    found = []
    for entry in out.parent.iterdir() if out.parent.is_dir() else []:
        match = next((m for p in patterns if (m := p.fullmatch(entry.name))), None)
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


def _marked_for(path: Path, out: Path) -> bool:
    """A new save's marker names OUT (an older graphpatch's names nothing)."""
    marker = path / MARKER
    if marker.is_symlink() or not marker.is_file():
        return False
    try:
        said = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return not isinstance(said, dict) or said.get("out", out.name) == out.name


def recover(out: Path) -> list[str]:
    """Finish or undo what interrupted saves of ``out`` left; say what was done.

    An old save set aside with no OUT in its place is renamed back; with a
    complete OUT it is deleted when its manifest proves it graphpatch's.
    Marked, unfinished new saves of OUT are deleted.
    """
    done = []
    for role, path in sorted(_leftovers(out), key=lambda item: item[0] == NEW):
        if role == OLD and is_save(path) and not out.exists():
            path.rename(out)
            done.append(f"restored {out} from {path.name}, left by a killed replace")
        elif role == OLD and is_save(path) and is_save(out):
            if unproven(path) == []:
                shutil.rmtree(path)
                done.append(f"removed {path.name}, the old save a killed replace left")
            else:
                done.append(f"left {path.name}: graphpatch cannot prove it wrote it")
        elif role == NEW and _marked_for(path, out):
            shutil.rmtree(path)
            done.append(f"removed {path.name}, a save that was killed while writing")
    return done


def write_atomically(
    out: Path,
    write: Callable[[Path], None],
    progress: Callable[[str], None],
    check: Callable[[], None] = lambda: None,
) -> None:
    """Have ``write`` fill a new directory, then, holding OUT's lock and once
    ``check`` passes again, put it in OUT's place."""
    out = Path(os.path.abspath(out))
    tmp = out.parent / f".graphpatch-{NEW}-{os.getpid()}-{tag(out)}"
    aside = out.parent / f".graphpatch-{OLD}-{os.getpid()}-{tag(out)}"
    tmp.mkdir(parents=True)
    try:
        (tmp / MARKER).write_text(json.dumps({"out": out.name}))
        write(tmp)
        with locked(out):
            check()
            _replace(out, tmp, aside, progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if aside.exists():
        progress(f"removing the old save {aside.name}")
        shutil.rmtree(aside)


def _replace(out: Path, tmp: Path, aside: Path, progress) -> None:
    if out.exists():
        progress(f"moving the old {out.name} aside to {aside.name}")
        out.rename(aside)
    progress(f"moving the new save in as {out.name}")
    try:
        tmp.rename(out)
    except BaseException:
        if aside.exists() and not out.exists():
            aside.rename(out)
        raise
    (out / MARKER).unlink()
