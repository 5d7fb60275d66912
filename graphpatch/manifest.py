"""The files graphpatch writes into every save of its own, and the proof
that a directory holds nothing else.

A save holds a manifest, ``graphpatch-manifest.json``: each file's name, size
and sha256 (hashing runs at about 0.5 GB/s on a loaded 2-core machine, so a
save of 1 GB spends some 2 s on it), the inode and ctime it was written with,
and a hash of config.json's graphpatch section. ``unproven`` names what a
directory holds beyond it; ``outdir`` replaces only a directory where that is
nothing, and ``opening`` refuses a section edited by hand.
"""

import hashlib
import json
import os
from pathlib import Path

MARKER = ".graphpatch-partial"  # written first into every directory we write
MANIFEST = "graphpatch-manifest.json"
CHUNK = 8 << 20  # bytes hashed at a time


def section_hash(section: object) -> str:
    """The hash of a graphpatch section as JSON reads it back."""
    text = json.dumps(json.loads(json.dumps(section)), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


_hashes: dict[tuple, str] = {}  # a file's identity -> its sha256, this process


def file_hash(path: Path) -> str:
    """The sha256 of a file, hashed once per process while it is unchanged."""
    st = path.stat()
    identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if identity not in _hashes:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        _hashes[identity] = digest.hexdigest()
    return _hashes[identity]


def write_manifest(tmp: Path, section: dict) -> None:
    """List every file under ``tmp`` (but the marker) in its manifest."""
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        name = path.relative_to(tmp).as_posix()
        if name != MARKER:
            st = path.stat()
            files[name] = {
                "size": st.st_size,
                "sha256": file_hash(path),
                "written": [st.st_ino, st.st_ctime_ns],
            }
    manifest = {"files": files, "section": section_hash(section)}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))


def read_manifest(path: Path) -> dict | None:
    """The manifest in ``path``, None when there is none; a malformed one
    reads as one listing nothing."""
    file = path / MANIFEST
    if file.is_symlink() or not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text())
        files = manifest["files"]
        assert all(
            isinstance(e["size"], int) and isinstance(e["sha256"], str)
            for e in files.values()
        )
        return manifest
    except (OSError, ValueError, KeyError, TypeError, AttributeError, AssertionError):
        return {"files": {}, "section": None}


def _unchanged(path: Path, entry: dict) -> bool:
    st = path.stat()
    if st.st_size != entry["size"]:
        return False
    if entry.get("written") == [st.st_ino, st.st_ctime_ns]:
        return True  # the very file written: its ctime moves with any change
    return file_hash(path) == entry["sha256"]


def unproven(path: Path) -> list[str] | None:
    """What in ``path`` graphpatch cannot prove it wrote (``NOTES.txt``,
    ``eval/``, ``config.json (changed)``); None when it holds no manifest."""
    manifest = read_manifest(path)
    if manifest is None:
        return None
    listed = manifest["files"]
    folders = {str(Path(name).parent) for name in listed}
    folders |= {str(p) for name in folders for p in Path(name).parents}
    found: list[str] = []
    files: list[str] = []
    for root, dirs, names in os.walk(path):
        rel = Path(root).relative_to(path)
        for d in sorted(dirs):
            if (rel / d).as_posix() not in folders or Path(root, d).is_symlink():
                found.append(f"{(rel / d).as_posix()}/")
                dirs.remove(d)
        for name in sorted(names):
            entry, full = (rel / name).as_posix(), Path(root, name)
            ours = entry in listed and full.is_file() and not full.is_symlink()
            if entry in (MANIFEST, MARKER) and not full.is_symlink():
                continue
            (files if ours else found).append(entry)
    if found:
        return sorted(found)
    return [f"{f} (changed)" for f in files if not _unchanged(path / f, listed[f])]
