"""`gorafit run` with hostile inputs and folders: nothing of the user's lost, no code run, no NaN accepted, and
one sentence with exit code 2 for each bad input (issue: untrusted plans, adapters and configs)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gorafit.cli import cli
from goraplan.cli_support import run_cli
from goraplan.untrusted import strict_json
from tests.cli_runner import run_command
from tests.gorafit.test_train import make_run_inputs

FAST = ["--batch-size", 4, "--logging-steps", 1, "--disable-tqdm", "--report-to", "none", "--eval-fraction", 0.1,
        "--save-steps", 1]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_run_inputs(tmp_path_factory.mktemp("safety"), "causal-lm", n=40)


@pytest.fixture(scope="module")
def finished_run(inputs, tmp_path_factory):
    """A completed two-step run, copied afresh for each test that may damage it."""
    out = tmp_path_factory.mktemp("done") / "run"
    with pytest.raises(SystemExit) as exc:
        run_cli(cli, [str(a) for a in ["run", inputs["plan"], "--max-steps", 2, "-o", out, *FAST]])
    assert exc.value.code == 0
    return out


@pytest.fixture()
def previous(finished_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def run(args, capsys):
    return run_command(cli, args, capsys)


def one_sentence(code, err, *fragments):
    assert code == 2, err
    lines = err.rstrip("\n").split("\n")
    last = lines[-1]
    assert last.startswith("Error: ") and sum(line.startswith("Error: ") for line in lines) == 1, err
    assert "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in last, err


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ item 1
@pytest.mark.parametrize("bad", [["--data", "missing.jsonl"], ["--model", "no/such/model/folder"],
                                 ["--eval-data", "not-json.jsonl"], ["--lr", "-1"]])
def test_overwrite_checks_every_input_before_replacing(inputs, previous, capsys, cli_env, bad, tmp_path):
    (tmp_path / "not-json.jsonl").write_text("this is not json\n")
    bad = [str(tmp_path / b) if b.endswith("json.jsonl") else b for b in bad]
    before = snapshot(previous)
    code, _, err = run(["run", inputs["plan"], "-o", previous, "--overwrite", "--max-steps", 1, *FAST, *bad], capsys)
    one_sentence(code, err)
    assert snapshot(previous) == before  # files lost: none


def test_a_run_that_fails_on_its_inputs_leaves_no_folder(inputs, tmp_path, capsys, cli_env):
    out = tmp_path / "new-run"
    code, _, err = run(["run", inputs["plan"], "-o", out, "--data", tmp_path / "missing.jsonl", *FAST], capsys)
    one_sentence(code, err)
    assert not out.exists()


# ------------------------------------------------------------------------------------------ item 3
def test_overwrite_refuses_run_files_that_no_record_claims(inputs, tmp_path, capsys, cli_env):
    out = tmp_path / "mine"
    for name in ("adapter/weights.bin", "runs/notes.txt"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("the user's")
    before = snapshot(out)
    code, _, err = run(["run", inputs["plan"], "-o", out, "--overwrite", "--max-steps", 1, *FAST], capsys)
    one_sentence(code, err, "no run.json says gorafit wrote it")
    assert snapshot(out) == before


def test_overwrite_deletes_only_what_the_record_lists(inputs, previous, capsys, cli_env):
    (previous / "runs").mkdir()
    (previous / "runs" / "notes.txt").write_text("the user's: the run did not report to TensorBoard")
    (previous / "keep.txt").write_text("the user's")
    record = json.loads((previous / "run.json").read_text())
    assert "runs" not in record["files"]
    record["files"] += ["../precious", "/etc", "keep.txt", "."]  # a hostile record: names outside the layout
    (previous / "run.json").write_text(json.dumps(record))
    (previous.parent / "precious").write_text("outside the run folder")
    code, _, err = run(["run", inputs["plan"], "-o", previous, "--overwrite", "--max-steps", 1, *FAST], capsys)
    assert code == 0, err
    assert (previous / "runs" / "notes.txt").is_file() and (previous / "keep.txt").is_file()
    assert (previous.parent / "precious").is_file()
    assert json.loads((previous / "run.json").read_text())["global_step"] == 1


@pytest.mark.parametrize("which", ["data", "plan", "model"])
def test_run_files_never_land_on_an_input(inputs, tmp_path, capsys, cli_env, which):
    import shutil

    folder = tmp_path / "work"
    folder.mkdir()
    plan = shutil.copy(inputs["plan"], folder / "plan.gora")
    data = shutil.copy(inputs["data"], folder / "log.jsonl")  # a data file named like the run's log
    model = shutil.copytree(inputs["model"], tmp_path / "model")
    out = {"data": folder, "plan": folder / "plan.gora", "model": model}[which]
    before = {**snapshot(folder), **snapshot(model)}
    code, _, err = run(["run", plan, "--data", data, "--model", model, "-o", out, "--overwrite", "--max-steps", 1,
                        *FAST], capsys)
    one_sentence(code, err)
    assert {**snapshot(folder), **snapshot(model)} == before


# ------------------------------------------------------------------------------------------ item 11
def test_the_adapter_is_readable_as_the_umask_says(finished_run):
    from goraplan.files import current_umask

    for path in (finished_run / "adapter").iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask(), path.name


# ------------------------------------------------------------------------------------------ item 5
def test_sigterm_records_interrupted_and_leaves_no_partial(inputs, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "GORA_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "gorafit", "run", str(inputs["plan"]), "-o", str(out),
                             "--max-steps", "100000", *map(str, FAST)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and b'"running"' not in _read(out / "run.json"):  # written as training starts
        time.sleep(0.1)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    record = strict_json((out / "run.json").read_bytes(), "run.json")
    assert record["status"] == "interrupted", record.get("error")
    assert not [p for p in tmp_path.rglob("*.partial")]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


# ------------------------------------------------------------------------------------------ item 8
@pytest.mark.parametrize("setting", ["lr", "weight_decay", "num_train_epochs", "logging_steps", "warmup_ratio",
                                     "label_smoothing_factor"])
@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf"])
def test_non_finite_numbers_in_a_config_file(inputs, tmp_path, capsys, cli_env, setting, value):
    config = tmp_path / "train.yaml"
    config.write_text(f"{setting}: {value}\n")
    at = FAST.index("--logging-steps")
    flags = FAST[:at] + FAST[at + 2:]  # the file's logging_steps, not the flag's
    code, _, err = run(["run", inputs["plan"], "--config", config, "-o", tmp_path / "run", *flags], capsys)
    one_sentence(code, err, "finite")
    assert not (tmp_path / "run").exists()


def test_a_loss_that_turns_nan_fails_the_run_with_valid_json(inputs, tmp_path, capsys, cli_env):
    out = tmp_path / "run"
    code, _, err = run(["run", inputs["plan"], "-o", out, "--lr", "1e30", "--lr-b-max", "none", "--max-steps", 6,
                        "--max-grad-norm", 0, *FAST], capsys)
    one_sentence(code, err, "became")
    record = strict_json((out / "run.json").read_bytes(), "run.json")  # strict: bare NaN would be refused
    assert record["status"] == "failed" and "became" in record["error"]
    for line in (out / "log.jsonl").read_text().splitlines():
        strict_json(line, "log.jsonl")


# ------------------------------------------------------------------------------------------ tracebacks
def test_dataloader_workers_are_bounded(inputs, tmp_path, capsys, cli_env):
    code, _, err = run(["run", inputs["plan"], "-o", tmp_path / "run", "--dataloader-num-workers", 100000, *FAST],
                       capsys)
    one_sentence(code, err, "dataloader_num_workers")


def test_read_only_output_folder(inputs, tmp_path, capsys, cli_env):
    if os.geteuid() == 0:
        out = Path("/sys/gora-safety-test/run")  # read-only even for root
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        out = locked / "run"
    code, _, err = run(["run", inputs["plan"], "-o", out, "--max-steps", 1, *FAST], capsys)
    one_sentence(code, err)


@pytest.mark.parametrize("content", ["[1, 2]", '"run"', "null", "{", '{"status": NaN}', '{"a": 1, "a": 2}'])
def test_run_json_that_is_not_an_object(previous, capsys, content, inputs, cli_env):
    (previous / "run.json").write_text(content)
    code, _, err = run(["inspect", previous], capsys)
    one_sentence(code, err, "run.json")
    code, _, err = run(["run", inputs["plan"], "-o", previous, "--resume", "--max-steps", 3, *FAST], capsys)
    one_sentence(code, err, "run.json")


@pytest.mark.parametrize("record", [{"plan": "x", "settings": [], "metrics": {"global_step": "x", "eval_loss": "y"}},
                                    {"status": "\x1b[2J\ncompleted (verified)", "plan": {"path": "\x07"}}])
def test_inspect_shows_a_hostile_record_inertly(previous, capsys, record):
    (previous / "run.json").write_text(json.dumps(record))
    code, out, err = run(["inspect", previous], capsys)
    assert code == 0, err
    assert "\x1b" not in out and "\x07" not in out and not any(line.startswith("completed") for line in out.splitlines())


SEARCH = {"chosen": 1e-4, "candidates": [{"lr": 1e-3, "held_out_loss": None, "train_losses": [0.7, None]}],
          "start_loss": 0.69, "steps_per_candidate": 2, "probe_batch_size": 8, "held_out_batches": 1, "seconds": 1.0,
          "rule": "learning seen", "extra": {"edge": 3e-4}}


@pytest.mark.parametrize("change", [{"extra": {"edge": "x"}}, {"rule": 7}, {"chosen": "1e-4"}, {"candidates": {}},
                                    {"candidates": [{"lr": True, "held_out_loss": 1.0, "train_losses": []}]},
                                    {"extra": []}, {"seconds": None}])
def test_a_hostile_lr_search_is_one_sentence(previous, capsys, change):
    (previous / "lr_search.json").write_text(json.dumps({**SEARCH, **change}))
    code, _, err = run(["inspect", previous], capsys)
    one_sentence(code, err, "lr_search.json")


def test_an_lr_search_is_shown_inertly(previous, capsys):
    (previous / "lr_search.json").write_text(json.dumps({**SEARCH, "rule": "\x1b[2J\nchosen: 1.0"}))
    code, out, err = run(["inspect", previous], capsys)
    assert code == 0, err
    assert "\x1b" not in out and "stability edge: 0.0003" in out and "diverged" in out
    assert not any(line.startswith("chosen: 1.0") for line in out.splitlines())


def damage(checkpoint: Path, name: str) -> None:
    target = checkpoint / name
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])


@pytest.mark.parametrize("name", ["trainer_state.json", "adapter_model.safetensors", "optimizer.pt"])
def test_damaged_checkpoints_on_resume(inputs, previous, capsys, cli_env, name):
    ordered = sorted(previous.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    damage(ordered[-1], name)  # the newest is passed over: the run resumes from the one before
    code, _, err = run(["run", inputs["plan"], "-o", previous, "--resume", "--max-steps", 3, *FAST], capsys)
    assert code == 0, err
    assert json.loads((previous / "run.json").read_text())["resumed_from"].endswith(ordered[-2].name)
    for checkpoint in previous.glob("checkpoint-*"):  # now every one is damaged: one sentence
        damage(checkpoint, name)
    code, _, err = run(["run", inputs["plan"], "-o", previous, "--resume", "--max-steps", 4, *FAST], capsys)
    one_sentence(code, err, "can be resumed from")


# ------------------------------------------------------------------------------------------ item 6
def remote_code_folder(root: Path, marker: Path, source: Path) -> Path:
    """A model folder whose config asks for its own Python code; the code, if run, leaves `marker`."""
    import shutil

    folder = shutil.copytree(source, root / "remote-code-model")
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import LlamaConfig as EvilConfig\n"
                                    "from transformers import LlamaForCausalLM as EvilModel\n")
    for name, auto in (("config.json", {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}),
                       ("tokenizer_config.json", {"AutoTokenizer": ["evil.EvilConfig", None]})):
        config = json.loads((folder / name).read_text())
        config["auto_map"] = auto
        if name == "config.json":
            config["model_type"] = "gora-remote-code"  # no class of transformers' own: only its code could load it
        (folder / name).write_text(json.dumps(config))
    return folder


def test_no_model_code_runs_without_the_flag(inputs, tmp_path, capsys, cli_env, monkeypatch):
    marker = tmp_path / "code-ran"
    folder = remote_code_folder(tmp_path, marker, inputs["model"])
    monkeypatch.setattr("sys.stdin", open(os.devnull))  # a prompt would read this and see no answer
    code, _, err = run(["run", inputs["plan"], "--model", folder, "--ignore-fingerprint", "-o", tmp_path / "run",
                        "--max-steps", 1, *FAST], capsys)
    one_sentence(code, err)
    assert not marker.exists()
