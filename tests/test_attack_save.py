"""Attacks on --save: a user's files are never lost, whatever OUT is, and a
save killed at any point leaves one complete model under OUT or its aside."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import digest, one_error_line, run

import graphpatch
from graphpatch import saving
from graphpatch.manifest import MARKER
from graphpatch.outdir import is_save

SCRIPT = Path(__file__).parent / "scripts" / "killed_save.py"


@pytest.fixture
def place(zoo_dir, tmp_path):
    """A source checkpoint with a sibling beside it, in a folder of its own."""
    source = Path(shutil.copytree(zoo_dir("llama"), tmp_path / "work" / "src"))
    sibling = tmp_path / "work" / "sibling"
    sibling.mkdir()
    (sibling / "notes.txt").write_text("mine")
    return source


def save_to(source: Path, out, *flags: str):
    return run("apply", "--passes", "fuse_glu", source, "--save", out, *flags)


@pytest.mark.parametrize(
    "target, words",
    [
        (lambda src: src, "is the source model or holds it"),
        (lambda src: src.parent, "is the source model or holds it"),
        (lambda src: src / "sub", "lies inside the source model"),
        (lambda src: src.parent / "sibling", "was not written by graphpatch"),
        (lambda src: src / "config.json", "source model"),
    ],
    ids=["source", "parent-of-source", "inside-source", "other-dir", "source-file"],
)
def test_force_never_replaces_what_graphpatch_did_not_write(place, target, words):
    before = digest(place.parent)
    for flags in ((), ("--force",)):
        line = one_error_line(save_to(place, target(place), *flags))
        assert words in line and "--force" not in line
    assert digest(place.parent) == before


def test_a_file_or_a_symlink_is_never_replaced(place):
    (place.parent / "afile").write_text("keep")
    (place.parent / "alink").symlink_to(place)
    before = digest(place.parent)
    assert "not a directory" in one_error_line(
        save_to(place, place.parent / "afile", "--force")
    )
    assert "symlink" in one_error_line(
        save_to(place, place.parent / "alink", "--force")
    )
    assert digest(place.parent) == before


def test_an_earlier_save_is_replaced_only_with_force(place):
    out = place.parent / "out"
    assert save_to(place, out).exit_code == 0 and is_save(out)
    line = one_error_line(save_to(place, out))
    assert "earlier graphpatch save (--force replaces it)" in line
    assert save_to(place, out, "--force").exit_code == 0
    leftovers = sorted(p.name for p in place.parent.iterdir())
    assert leftovers == ["out", "sibling", "src"] and not (out / MARKER).exists()


def test_a_glob_in_out_matches_nothing_but_its_own_name(place):
    folder = place.parent / "d"
    folder.mkdir()
    for name in (".backup.tmp-2024", ".*.tmp-1", ".x.graphpatch-new-1"):
        (folder / name).mkdir()
        (folder / name / "data").write_text("mine")
    before = digest(folder)
    assert save_to(place, folder / "*").exit_code == 0
    assert {k: v for k, v in digest(folder).items() if not k.startswith("*")} == before


def test_leftovers_are_removed_only_when_marked_and_dead(place):
    out = place.parent / "out"
    unmarked = place.parent / ".out.graphpatch-new-999999"
    alive = place.parent / f".out.graphpatch-new-{os.getppid()}"
    dead = place.parent / ".out.graphpatch-new-999998"
    for folder in (unmarked, alive, dead):
        folder.mkdir()
    (alive / MARKER).write_text("{}")
    (dead / MARKER).write_text("{}")
    assert save_to(place, out).exit_code == 0
    assert unmarked.is_dir() and alive.is_dir() and not dead.exists()


@pytest.mark.parametrize("mb", ["nan", "inf", "0", "-1"])
def test_max_shard_mb_is_checked_before_anything_runs(place, mb):
    line = one_error_line(save_to(place, place.parent / "out", "--max-shard-mb", mb))
    assert "--max-shard-mb must be a positive size" in line
    assert not (place.parent / "out").exists()


def test_an_unwritable_place_is_one_line(place):
    before = digest(place.parent)
    assert "cannot write" in one_error_line(save_to(place, "/sys/graphpatch-out"))
    assert digest(place.parent) == before


@pytest.mark.parametrize(
    "options, words", [("size=256k", "No space"), ("ro", "Read-only")]
)
def test_a_full_or_read_only_disk_leaves_nothing(place, small_fs, options, words):
    fs = small_fs(options)
    assert words in one_error_line(save_to(place, fs / "out"))
    assert list(fs.iterdir()) == []


def test_a_disk_that_fills_during_the_write_leaves_nothing(place, small_fs):
    needed = sum(f.stat().st_size for f in place.glob("*.safetensors"))
    fs = small_fs(f"size={needed // 1024 + 8}k")  # room for the weights only
    line = one_error_line(save_to(place, fs / "out"), after_report=True)
    assert "No space left" in line
    assert list(fs.iterdir()) == []


# The steps save reports; the last three happen only when OUT is replaced.
STEPS = [
    "writing model-00002",
    "writing config.json",
    "moving the old",
    "moving the new",
    "removing the old",
]


@pytest.mark.parametrize(
    "step, replace",
    [(step, False) for step in STEPS[:2]] + [(step, True) for step in STEPS],
    ids=[f"first-save:{s}" for s in STEPS[:2]] + [f"replace:{s}" for s in STEPS],
)
def test_a_save_killed_at_any_step_loses_nothing(place, step, replace):
    out = place.parent / "out"
    if replace:
        model, _ = graphpatch.load(place)
        graphpatch.save(model, place, out)  # an unpatched save: the old one
    old = digest(out) if replace else None
    before = {k: v for k, v in digest(place.parent).items() if not k.startswith("out")}
    done = subprocess.run(
        [sys.executable, SCRIPT, place, out, step], capture_output=True, text=True
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    after = digest(place.parent)
    assert {k: after[k] for k in before} == before  # source and sibling intact
    asides = list(place.parent.glob(".graphpatch-old-*"))
    if replace:
        complete = [p for p in (out, *asides) if p.is_dir() and is_save(p)]
        assert complete, "no complete model under OUT or its aside"
    else:
        assert not out.exists() and not asides
    said = saving.prepare(place, out, force=True)  # a later run recovers
    if step == "moving the new":
        assert any("restored" in line for line in said) and digest(out) == old
    names = sorted(p.name for p in place.parent.iterdir())
    assert names == (["out"] if out.exists() else []) + ["sibling", "src"]
    if out.exists():
        graphpatch.load(out)  # the model under OUT opens
