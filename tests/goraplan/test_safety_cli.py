"""goraplan's outputs never destroy a user's file: never over an input, --overwrite for anything else that
exists, a chart only as an image; files written with the umask's permissions; no leftovers."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

import goraplan
from goraplan.cli import cli
from goraplan.cli_support import run_cli
from goraplan.errors import GoraError
from goraplan.files import (
    atomic_dir,
    atomic_file,
    check_not_input,
    staged_dir,
    sweep_partials,
    write_json_atomic,
)
from tests.cli_runner import run_command
from tests.tiny import random_batches, tiny_llama


def cli_run(args, capsys):
    return run_command(cli, args, capsys)


def snapshot(*roots):
    """path -> sha256 of every file under the roots: compared before and after to count lost files."""
    found = {}
    for root in roots:
        paths = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for p in paths:
            found[p] = hashlib.sha256(p.read_bytes()).hexdigest()
    return found


@pytest.fixture()
def inputs(tiny_model_dir, tiny_text_data, tmp_path, cli_env):
    """A private copy of the model folder and data file, so that a wrongly written output cannot hurt others."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    data = tmp_path / "data.jsonl"
    shutil.copy(tiny_text_data, data)
    return model, data


def build_args(model, data):
    return ["build", "--model", model, "--data", data, "--steps", 2, "--batch-size", 2, "--rank", 4,
            "--max-length", 32]


# ------------------------------------------------------------------------------------------ item 4
@pytest.mark.parametrize("target", ["data", "model-weights", "model-folder", "symlink-to-data", "hardlink-to-data",
                                    "inside-model"])
def test_build_never_writes_over_an_input(inputs, tmp_path, capsys, target):
    model, data = inputs
    weights = next(model.glob("*.safetensors"))
    output = {"data": data, "model-weights": weights, "model-folder": model,
              "symlink-to-data": tmp_path / "link.gora", "hardlink-to-data": tmp_path / "hard.gora",
              "inside-model": model / "plan.gora"}[target]
    if target == "symlink-to-data":
        output.symlink_to(data)
    if target == "hardlink-to-data":
        os.link(data, output)
    before = snapshot(model, data)
    code, _, err = cli_run([*build_args(model, data), "-o", output, "--overwrite"], capsys)
    assert code == 2 and "Error: " in err and "Traceback" not in err, err  # click itself refuses a folder for -o
    assert "input" in err or "directory" in err
    assert snapshot(model, data) == before  # files lost: none


def test_build_asks_for_overwrite_before_replacing_another_file(inputs, tmp_path, capsys):
    model, data = inputs
    precious = tmp_path / "notes.txt"
    precious.write_text("mine")
    code, _, err = cli_run([*build_args(model, data), "-o", precious], capsys)
    assert code == 2 and "--overwrite" in err and precious.read_text() == "mine"
    code, _, err = cli_run([*build_args(model, data), "-o", precious, "--overwrite"], capsys)
    assert code == 0, err
    assert goraplan.load_plan(precious).manifest.settings.rank == 4


def test_ranks_from_plan_is_an_input(inputs, tmp_path, capsys):
    model, data = inputs
    plan = tmp_path / "p.gora"
    assert cli_run([*build_args(model, data), "-o", plan], capsys)[0] == 0
    before = snapshot(plan)
    code, _, err = cli_run(["build", "--model", model, "--data", data, "--steps", 2, "--batch-size", 2,
                            "--max-length", 32, "--ranks-from", plan, "-o", plan, "--overwrite"], capsys)
    assert code == 2 and "input" in err and snapshot(plan) == before


# ------------------------------------------------------------------------------------------ item 10
@pytest.mark.parametrize("seed", [-1, 4294967296, 2**64])
def test_seed_outside_32_bits_is_one_sentence_before_any_work(inputs, tmp_path, capsys, seed):
    model, data = inputs
    code, _, err = cli_run([*build_args(model, data), "--seed", seed, "-o", tmp_path / "p.gora"], capsys)
    assert code == 2 and "seed" in err and err.count("\n") == 1
    assert not (tmp_path / "p.gora").exists()


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory):
    plan = goraplan.build_plan(tiny_llama(), random_batches(2), goraplan.PlanSettings(steps=2, rank=4))
    return plan.save(tmp_path_factory.mktemp("plan") / "p.gora")


@pytest.mark.parametrize("name", ["ranks.gora", "ranks.txt", "ranks", "ranks.json"])
def test_plot_needs_an_image_extension(plan_path, tmp_path, capsys, name):
    code, out, err = cli_run(["inspect", plan_path, "--plot", tmp_path / name], capsys)
    assert code == 2 and ".png" in err and err.count("\n") == 1 and out == ""
    assert not (tmp_path / name).exists()


def test_plot_never_replaces_the_plan(plan_path, tmp_path, capsys):
    plan = tmp_path / "p.png"
    plan.write_bytes(plan_path.read_bytes())
    code, _, err = cli_run(["inspect", plan, "--plot", plan], capsys)
    assert code == 2 and "input" in err and plan.read_bytes() == plan_path.read_bytes()


def test_plot_writes_an_image_and_nothing_else(plan_path, tmp_path, capsys):
    code, _, err = cli_run(["inspect", plan_path, "--plot", tmp_path / "ranks.svg"], capsys)
    assert code == 0, err
    assert (tmp_path / "ranks.svg").read_text().lstrip().startswith("<?xml")
    assert [p.name for p in tmp_path.iterdir()] == ["ranks.svg"]


# ------------------------------------------------------------------------------------------ item 11: umask
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_outputs_follow_the_umask(plan_path, tmp_path, umask):
    old = os.umask(umask)
    try:
        plan = goraplan.load_plan(plan_path).save(tmp_path / "p.gora")
        with atomic_dir(tmp_path / "cache-entry") as tmp:
            (tmp / "config.json").write_text("{}")
        with staged_dir(tmp_path / "export", overwrite=False, inputs=[plan]) as tmp:
            (tmp / "adapter_config.json").write_text("{}")
        record = write_json_atomic(tmp_path / "run.json", {"status": "completed"})
    finally:
        os.umask(old)
    assert stat.S_IMODE(plan.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(record.stat().st_mode) == 0o666 & ~umask
    for folder in (tmp_path / "cache-entry", tmp_path / "export"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask


# ------------------------------------------------------------------------------------------ files.py
def test_check_not_input_resolves_symlinks_to_folders(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "run")
    with pytest.raises(GoraError, match="is an input"):
        check_not_input(tmp_path / "alias", [tmp_path / "run"])
    with pytest.raises(GoraError, match="inside the input folder"):
        check_not_input(tmp_path / "alias" / "export", [tmp_path / "run"])
    with pytest.raises(GoraError, match="contains the input"):
        check_not_input(tmp_path, [tmp_path / "alias" / "adapter"])
    check_not_input(tmp_path / "export", [tmp_path / "run", None])


def test_a_failed_replacement_keeps_the_old_output(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_dir(out, overwrite=True) as tmp:
        (tmp / "half").write_text("new")
        raise RuntimeError("interrupted")
    assert (out / "keep.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_overwrite_replaces_whole_folder_atomically(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with staged_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def killed_while(work) -> None:
    """Run `work` in a child process that dies there (SIGKILL runs no cleanup: no finally, no atexit)."""
    pid = os.fork()
    if pid == 0:
        try:
            work()
        finally:
            os._exit(9)
    os.waitpid(pid, 0)


def test_partials_of_a_killed_process_are_swept(tmp_path):
    """The next write of the same target removes what a dead process left."""
    target = tmp_path / "p.gora"

    def write_half():
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            os._exit(9)

    killed_while(write_half)
    left = list(tmp_path.iterdir())
    assert len(left) == 1 and left[0].name.endswith(".partial")
    with atomic_file(target) as tmp:
        tmp.write_text("whole")
    assert [p.name for p in tmp_path.iterdir()] == ["p.gora"] and target.read_text() == "whole"
    assert sweep_partials(target) == []


def test_an_old_output_moved_aside_by_a_killed_process_comes_back(tmp_path):
    import tempfile

    from goraplan import files

    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("old")

    def move_aside():  # killed between moving the old output aside and renaming the new one in
        old = Path(tempfile.mkdtemp(prefix=files._partial_prefix(out), suffix=files.REPLACED_SUFFIX, dir=tmp_path))
        os.replace(out, old / "replaced")

    killed_while(move_aside)
    assert not out.exists()
    sweep_partials(out)
    assert (out / "keep.txt").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["export"]


# ------------------------------------------------------------------------------------------ item 7, errors
def test_every_error_sentence_is_printed_inert(capsys):
    """An error may quote a file (a module name, a data row): whatever it quotes cannot act on the terminal."""
    import click

    @click.command()
    def command():
        raise GoraError("module layers.0\x1b[2J\rError: none\n(verified) is missing")

    with pytest.raises(SystemExit) as exc:
        run_cli(command, [])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "\x1b" not in err and "\r" not in err
    assert err.startswith("Error: module layers.0\\x1b[2J\\rError: none\\n(verified)")
