"""Attacks on --save, second round: a save replaces only files its manifest
proves graphpatch wrote, races and odd places lose nothing, what a save
copies is counted and kept, and a save always reopens to the model it came
from (issue 23)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from helpers import TOKENS, digest, one_error_line, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphpatch
from graphpatch import LoadError, SaveError, manifest, outdir, saving
from graphpatch.manifest import MANIFEST


@pytest.fixture
def place(zoo_dir, tmp_path):
    """A source checkpoint (with a tokenizer and an adapters/ folder) in a
    folder of its own."""
    source = Path(shutil.copytree(zoo_dir("llama"), tmp_path / "work" / "src"))
    (source / "adapters").mkdir()
    (source / "adapters" / "adapter_config.json").write_text('{"rank": 8}')
    (source / "adapters" / "adapters.safetensors").write_bytes(os.urandom(3000))
    return source


def save_to(source: Path, out, *flags: str):
    return run("apply", "--passes", "fuse_glu", source, "--save", out, *flags)


def saved(source: Path, out: Path) -> Path:
    result = save_to(source, out)
    assert result.exit_code == 0, result.output
    return out


def test_force_refuses_a_save_the_user_put_files_in(place):
    out = saved(place, place.parent / "out")
    (out / "NOTES.txt").write_text("mine")
    (out / "eval").mkdir()
    (out / "eval" / "r.txt").write_text("results")
    before = digest(place.parent)
    line = one_error_line(save_to(place, out, "--force"))
    assert "holds NOTES.txt, eval/, which graphpatch did not write" in line
    assert digest(place.parent) == before


def test_force_refuses_a_save_whose_file_was_changed(place):
    out = saved(place, place.parent / "out")
    weights = out / "model.safetensors"
    stamp = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # touch -r
    before = digest(place.parent)
    line = one_error_line(save_to(place, out, "--force"))
    assert "holds model.safetensors (changed)" in line
    assert digest(place.parent) == before


def test_a_copied_graphpatch_key_is_no_proof(place, tmp_path):
    out = saved(place, place.parent / "out")
    converted = place.parent / "converted"
    mlx_lm.convert(str(out), str(converted))  # copies the graphpatch section
    assert "graphpatch" in json.loads((converted / "config.json").read_text())
    (converted / "NOTES.txt").write_text("mine")
    app = place.parent / "userapp"
    (app / "src").mkdir(parents=True)
    (app / "src" / "main.py").write_text("print('hi')")
    (app / "notes.txt").write_text("mine")
    (app / "config.json").write_text(json.dumps({"graphpatch": {"theme": "dark"}}))
    before = digest(place.parent)
    for target in (converted, app):
        line = one_error_line(save_to(place, target, "--force"))
        assert f"has no {MANIFEST}" in line and "cannot prove it wrote it" in line
    assert digest(place.parent) == before


def test_a_save_of_an_older_graphpatch_is_not_replaced(place):
    out = saved(place, place.parent / "out")
    (out / MANIFEST).unlink(missing_ok=True)  # as an older graphpatch wrote it
    before = digest(place.parent)
    assert "cannot prove it wrote it" in one_error_line(save_to(place, out, "--force"))
    assert digest(place.parent) == before


@pytest.fixture(scope="module")
def one_save(tmp_path_factory, zoo_dir):
    model_dir = zoo_dir("llama")
    model, _ = graphpatch.load(model_dir)
    return graphpatch.save(model, model_dir, tmp_path_factory.mktemp("s") / "out")


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    name=st.text(
        st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)),
        min_size=1,
        max_size=40,
    ),
    folder=st.booleans(),
)
def test_any_entry_the_user_adds_stops_a_replace(one_save, tmp_path, name, folder):
    if name in (".", "..", MANIFEST, manifest.MARKER) or len(name.encode()) > 200:
        return
    copy = Path(shutil.copytree(one_save, tmp_path / "copy", dirs_exist_ok=True))
    try:
        assert manifest.unproven(copy) == []
        entry = copy / name
        if entry.exists():
            entry.unlink()  # one of ours: it is missing, and another takes its place
        (entry / "f").parent.mkdir() if folder else entry.write_text("mine")
        found = manifest.unproven(copy)
        assert found and found[0].startswith(name if not folder else f"{name}/")
        with pytest.raises(SaveError, match="which graphpatch did not write"):
            outdir.check_out(tmp_path / "src", copy, True)
    finally:
        shutil.rmtree(copy)


def test_recover_keeps_an_aside_holding_the_users_files(place):
    out = saved(place, place.parent / "out")
    aside = place.parent / ".out.graphpatch-old-999999"  # an older graphpatch's
    shutil.copytree(out, aside)
    (aside / "NOTES.txt").write_text("mine")
    said = saving.prepare(place, out, force=True)
    assert aside.is_dir() and (aside / "NOTES.txt").read_text() == "mine"
    assert any("cannot prove it wrote it" in line for line in said)


@pytest.mark.parametrize("inside", [".", "eval"])
def test_save_into_the_current_directory_is_refused_before_loading(
    place, monkeypatch, inside
):
    out = saved(place, place.parent / "out")
    (out / inside).mkdir(exist_ok=True)
    monkeypatch.chdir(out / inside)
    before = digest(place.parent)
    line = one_error_line(save_to(place, ".", "--force"))
    assert "is the current directory or holds it" in line
    assert digest(place.parent) == before


RACER = """
import sys, time
from pathlib import Path
import graphpatch
model_dir, out, barrier = sys.argv[1:4]
model, _ = graphpatch.load(model_dir)
def progress(line):
    if line.startswith("writing config.json"):  # both have checked OUT
        Path(barrier, str(__import__("os").getpid())).touch()
        for _ in range(600):
            if len(list(Path(barrier).iterdir())) >= 2:
                return
            time.sleep(0.05)
try:
    graphpatch.save(model, model_dir, out, progress=progress)
except graphpatch.SaveError as e:
    print(e)
    sys.exit(2)
"""


def test_two_saves_racing_for_one_out_never_both_succeed(place, tmp_path):
    out, barrier = place.parent / "out", tmp_path / "barrier"
    barrier.mkdir()
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, place, out, barrier],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(r.wait(timeout=120), r.stdout.read()) for r in racers]
    assert sorted(code for code, _ in results) == [0, 2], results
    assert any("earlier graphpatch save (force replaces it)" in o for _, o in results)
    assert sorted(p.name for p in place.parent.iterdir()) == ["out", "src"]
    assert manifest.unproven(out) == []


def test_a_240_character_out_name_is_saved_and_replaced(place):
    out = place.parent / ("o" * 240)
    saved(place, out)
    assert save_to(place, out, "--force").exit_code == 0
    assert sorted(p.name for p in place.parent.iterdir()) == [out.name, "src"]
    graphpatch.load(out)


def test_sub_folders_are_copied_byte_for_byte_and_replaceable(place):
    out = saved(place, place.parent / "out")
    for name in ("adapter_config.json", "adapters.safetensors"):
        assert (out / "adapters" / name).read_bytes() == (
            place / "adapters" / name
        ).read_bytes()
    assert save_to(place, out, "--force").exit_code == 0


def test_room_counts_every_file_a_save_copies(place, small_fs):  # noqa: F811
    weights = sum(f.stat().st_size for f in place.glob("*.safetensors"))
    (place / "pytorch_model.bin").write_bytes(os.urandom(4 << 20))
    fs = small_fs(f"size={weights // 1024 + 1024}k")  # the weights fit, not the rest
    line = one_error_line(save_to(place, fs / "out"))
    assert "No space left" in line and "MiB needed" in line
    assert list(fs.iterdir()) == []


def fused_save(zoo_dir, tmp_path, name="llama") -> Path:
    model_dir = zoo_dir(name)
    model, _ = graphpatch.load(model_dir)
    graphpatch.apply(model, "fuse_glu", verify=False)
    return graphpatch.save(model, model_dir, tmp_path / "fused", format="fused")


def test_a_plain_save_of_a_fused_save_is_refused_before_loading(zoo_dir, tmp_path):
    fused = fused_save(zoo_dir, tmp_path)
    data = (fused / "model.safetensors").read_bytes()  # unloadable, if loaded
    (fused / "model.safetensors").write_bytes(data[: len(data) // 2])
    line = one_error_line(save_to(fused, tmp_path / "again"))
    assert "already a saved patched model" in line
    assert not (tmp_path / "again").exists()


def edit_config(model_dir: Path, edit) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    edit(config)
    (model_dir / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda c: c["graphpatch"].pop("format"), "no format"),
        (lambda c: c["graphpatch"].pop("model_type"), "no model_type string"),
        (lambda c: c["graphpatch"].update(format="plain"), "is the fused marker"),
        (lambda c: c.pop("graphpatch"), "no graphpatch section"),
        (lambda c: c.update(model_type="graphpatch-x"), "not the one graphpatch"),
    ],
    ids=["no-format", "no-model-type", "plain-format", "no-section", "other-marker"],
)
def test_an_odd_fused_section_is_one_clear_line(zoo_dir, tmp_path, edit, words):
    fused = fused_save(zoo_dir, tmp_path)
    (fused / MANIFEST).unlink(missing_ok=True)  # the structural checks alone
    edit_config(fused, edit)
    line = one_error_line(run("apply", "--passes", "fuse_glu", fused))
    assert words in line and "KeyError" not in line and "'model_type'" not in line


def test_a_plain_section_without_format_is_one_clear_line(place, tmp_path):
    out = saved(place, tmp_path / "plain")
    (out / MANIFEST).unlink(missing_ok=True)
    edit_config(out, lambda c: c["graphpatch"].pop("format"))
    line = one_error_line(run("apply", "--passes", "fuse_glu", out))
    assert "graphpatch section: no format" in line


FUSED_LOAD = "import sys, graphpatch\ngraphpatch.load(sys.argv[1])"


def test_a_fused_save_passes_the_config_checks(zoo_dir, tmp_path):
    fused = fused_save(zoo_dir, tmp_path)
    (fused / MANIFEST).unlink(missing_ok=True)
    edit_config(fused, lambda c: c.update(num_hidden_layers=1_000_000))
    done = subprocess.run(
        [sys.executable, "-c", FUSED_LOAD, fused],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "num_hidden_layers is 1000000, but the weights hold 2 layers" in done.stderr


ALIAS = {"model.layers.0.mlp.down_proj.weight": "model.layers.1.mlp.down_proj.weight"}


@pytest.mark.parametrize("manifest", [True, False])
def test_a_hand_edited_alias_is_refused(zoo_dir, tmp_path, manifest):
    fused = fused_save(zoo_dir, tmp_path)
    if not manifest:
        (fused / MANIFEST).unlink(missing_ok=True)
    edit_config(fused, lambda c: c["graphpatch"]["aliases"].update(ALIAS))
    words = "not the one the save wrote" if manifest else "names an array the weight"
    with pytest.raises(LoadError, match=words):
        graphpatch.load(fused)


def test_a_hand_edited_plain_section_is_refused(place, tmp_path):
    out = saved(place, tmp_path / "plain")
    edit_config(out, lambda c: c.update(eos_token_id=1))  # outside the section
    graphpatch.load(out)
    edit_config(out, lambda c: c["graphpatch"]["passes"][0]["sites"].pop())
    with pytest.raises(LoadError, match="not the one the save wrote"):
        graphpatch.load(out)


def untied_argmax(model_dir: Path) -> mx.array:
    model, _ = graphpatch.load(model_dir)
    graphpatch.apply(model, "untied_head", model_dir=str(model_dir))
    return mx.argmax(model(TOKENS), axis=-1)


def test_a_tied_checkpoints_own_head_survives_a_plain_save(zoo_dir, tmp_path):
    source = zoo_dir("llama", head="negated")
    model, _ = graphpatch.load(source)
    graphpatch.apply(model, "fuse_glu")
    out = graphpatch.save(model, source, tmp_path / "out")
    assert mx.array_equal(untied_argmax(out), untied_argmax(source))


def test_a_model_of_another_directory_is_not_saved(zoo_dir, tmp_path):
    model, _ = graphpatch.load(zoo_dir("llama"))
    other = zoo_dir("llama", rope_theta=1_000_000.0)  # the same arrays
    with pytest.raises(SaveError, match="reopens to other logits"):
        graphpatch.save(model, other, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_model_quantized_after_load_is_not_saved(zoo_dir, tmp_path):
    model, _ = graphpatch.load(zoo_dir("llama"))
    nn.quantize(model, group_size=64, bits=4)
    with pytest.raises(SaveError, match="would not reopen as this model"):
        graphpatch.save(model, zoo_dir("llama"), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_part_replaced_after_apply_is_not_saved_over(zoo_dir, tmp_path):
    model_dir = zoo_dir("llama")
    model, _ = graphpatch.load(model_dir)
    graphpatch.apply(model, "fuse_glu")
    mlp = model.model.layers[0].mlp
    mlp.up_proj = nn.Linear(128, 256, bias=False)
    with pytest.raises(SaveError):
        graphpatch.save(model, model_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
