"""gorafit with the tools people use: data in their formats (column mapping, packing), B's learning rate in
every log, one sentence for missing packages, and accelerate's launchers."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from gorafit.cli import cli
from gorafit.recipe import train
from gorafit.settings import TrainSettings
from gorafit.training_args import launch_warning
from tests.cli_runner import run_command
from tests.gorafit.test_train import make_run_inputs, subprocess_env


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The causal run inputs, plus the same rows under other column names (question / answer)."""
    found = make_run_inputs(tmp_path_factory.mktemp("eco"), "causal-lm", n=64)
    rows = [json.loads(line) for line in found["data"].read_text().splitlines()]
    renamed = found["data"].with_name("qa.jsonl")
    renamed.write_text("".join(json.dumps({"question": r["prompt"], "answer": r["completion"]}) + "\n" for r in rows))
    return {**found, "qa": renamed}


def run(args, capsys):
    return run_command(cli, args, capsys)


@pytest.mark.parametrize(("extra", "message"), [
    (["--report-to", "wandb"], "--report-to wandb needs the wandb package, which is not installed: pip install wandb"),
    (["--optim", "galore_adamw"], "--optim galore_adamw needs a package that is not installed"),
])
def test_missing_packages_are_one_sentence(inputs, tmp_path, capsys, extra, message):
    if extra[0] == "--report-to" and importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    if extra[0] == "--optim" and importlib.util.find_spec("galore_torch") is not None:
        pytest.skip("galore_torch is installed here")
    code, _, err = run(["run", inputs["plan"], "-o", tmp_path / "run", "--max-steps", 1, *extra], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("Error: " + message), err
    assert not (tmp_path / "run" / "run.json").exists()  # stopped before any work


def test_mapped_packed_run_logs_the_learning_rate_of_b(inputs, tmp_path):
    out = tmp_path / "run"
    report = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
    result = train(inputs["plan"], TrainSettings(
        data=str(inputs["qa"]), columns="prompt=question,completion=answer", packing=True, max_steps=3,
        per_device_train_batch_size=2, logging_steps=1, save_steps=3, eval_fraction=0, learning_rate=1e-4,
        output_dir=str(out), report_to=report, disable_tqdm=True))
    record = json.loads((out / "run.json").read_text())
    assert record["data"]["columns"] == {"prompt": "question", "completion": "answer"} and record["data"]["packed"]
    assert record["settings"]["columns"] == {"prompt": "question", "completion": "answer"}
    # 64 examples of about 10 tokens, packed into rows of at most the plan's 32 tokens
    assert record["data"]["train_examples"] < 64 and result.metrics["global_step"] == 3
    entries = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    with_lr = [e for e in entries if "learning_rate" in e]
    assert len(with_lr) == 3
    for entry in with_lr:  # B at 16 x A (below the 3e-3 cap), at every step of the schedule
        assert entry["learning_rate_B"] == pytest.approx(16 * entry["learning_rate"], rel=1e-9)
    if report == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(next((out / "runs").rglob("events.out.tfevents.*")).parent))
        events.Reload()
        assert "train/learning_rate_B" in events.Tags()["scalars"]


def test_launch_warning_when_several_processes_run_as_one(monkeypatch):
    for name in ("MASTER_ADDR", "WORLD_SIZE", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    assert launch_warning() is None  # plain python
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    assert "runs as one" in launch_warning() and "accelerate launch --multi_gpu --num_processes N" in launch_warning()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch_warning() is None  # torchrun / accelerate --multi_gpu: a real group


def accelerate(*args) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *[str(a) for a in args]]


@pytest.mark.dist
def test_accelerate_launch_on_cpus(inputs, tmp_path):
    """accelerate's form for several CPU processes is --multi_gpu (torchrun underneath, gloo on CPUs); --cpu
    starts one process whatever --num_processes says, and gorafit says so."""
    common = ["--max-steps", 1, "--batch-size", 2, "--eval-fraction", 0, "--save-steps", 1, "--report-to", "none",
              "--disable-tqdm"]
    two = subprocess.run(accelerate("--multi_gpu", "--num_processes", 2, "--num_machines", 1, "--mixed_precision",
                                    "no", "--dynamo_backend", "no", "-m", "gorafit", "run", inputs["plan"],
                                    "-o", tmp_path / "two", *common),
                         env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    record = json.loads((tmp_path / "two" / "run.json").read_text())
    assert record["world_size"] == 2 and record["parallelism"]["mode"] == "ddp"
    assert "runs as one" not in two.stderr

    one = subprocess.run(accelerate("--cpu", "--num_processes", 2, "--num_machines", 1, "--mixed_precision", "no",
                                    "--dynamo_backend", "no", "-m", "gorafit", "run", inputs["plan"],
                                    "-o", tmp_path / "one", *common),
                         env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    assert json.loads((tmp_path / "one" / "run.json").read_text())["world_size"] == 1
    assert "warning: this run was launched for several processes but runs as one" in one.stderr


@pytest.mark.slow
@pytest.mark.dist
def test_accelerate_launch_trains_smollm2_on_two_cpu_processes(tmp_path):
    import goraplan
    from goraplan.build import build_plan
    from goraplan.data import collator_for, make_batches, prepare
    from goraplan.models import load_model

    model, tok = load_model("smollm2-135m")
    ds, _ = prepare("sarcasm-lm", tok, "causal-lm", max_length=32, limit=2)
    plan = build_plan(model, make_batches(ds, collator_for(tok, "causal-lm"), 1, 2),
                      goraplan.PlanSettings(steps=2, batch_size=1, max_length=32), model_name="smollm2-135m",
                      data_source="sarcasm-lm", data_split="train")
    plan.save(tmp_path / "plan.gora")
    done = subprocess.run(accelerate("--multi_gpu", "--num_processes", 2, "--num_machines", 1, "--mixed_precision",
                                     "no", "--dynamo_backend", "no", "-m", "gorafit", "run", tmp_path / "plan.gora",
                                     "-o", tmp_path / "run", "--max-steps", 1, "--batch-size", 1, "--max-train-samples",
                                     8, "--eval-fraction", 0, "--save-steps", 1, "--report-to", "none",
                                     "--disable-tqdm"),
                          env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["world_size"] == 2 and record["parallelism"]["mode"] == "ddp" and record["status"] == "completed"


def test_a_float32_plan_trains_on_the_bfloat16_load(inputs, tmp_path):
    """gorafit's fingerprint check accepts the bfloat16 load of the checkpoint the plan was built on."""
    result = train(inputs["plan"], TrainSettings(dtype="bfloat16", max_steps=1, per_device_train_batch_size=2,
                                                 eval_fraction=0, save_steps=1, output_dir=str(tmp_path / "run"),
                                                 report_to="none", disable_tqdm=True))
    assert result.metrics["global_step"] == 1 and result.record["settings"]["dtype"] == "bfloat16"
