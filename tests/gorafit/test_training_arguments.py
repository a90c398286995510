"""Any TrainingArguments field beside gorafit's own settings (config file and Python API), validated by
transformers in one sentence, and Trainer callbacks through `gorafit.train`."""

from __future__ import annotations

import json

import pytest
import yaml
from transformers import EarlyStoppingCallback

from gorafit import TrainSettings, train
from gorafit.cli import cli
from gorafit.settings import load_config_file
from tests.cli_runner import run_command
from tests.gorafit.test_train import make_run_inputs

FAST = dict(per_device_train_batch_size=4, logging_steps=1, disable_tqdm=True, eval_fraction=0.1)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_run_inputs(tmp_path_factory.mktemp("targs"), "causal-lm", n=80)


def run(args, capsys):
    return run_command(cli, args, capsys)


def test_training_arguments_fields_sit_beside_gorafit_settings():
    s = TrainSettings(learning_rate=1e-4, warmup_steps=3, torch_compile=True, run_name="gora",
                      report_to=["tensorboard"])
    assert s.training_arguments == {"warmup_steps": 3, "torch_compile": True, "run_name": "gora"}
    assert s.report_to == ["tensorboard"] and s.learning_rate == 1e-4
    short = TrainSettings(lr=3e-4, epochs=2)  # the command line's short names work in Python too
    assert (short.learning_rate, short.num_train_epochs, short.training_arguments) == (3e-4, 2, {})
    with pytest.raises(ValueError, match="unknown setting 'warmup_stepz' \\(did you mean 'warmup_steps'\\?\\)"):
        TrainSettings(warmup_stepz=3)


def test_config_file_takes_any_training_argument(inputs, tmp_path, capsys, cli_env):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "max_steps": 4, "eval_steps": 2, "save_steps": 2, "warmup_steps": 1, "eval_strategy": "steps",
        "load_best_model_at_end": True, "metric_for_best_model": "eval_loss", "greater_is_better": False,
        "run_name": "gora-best", "report_to": ["none"], "logging_steps": 1,
    }))
    assert load_config_file(config)["load_best_model_at_end"] is True
    out = tmp_path / "run"
    code, stdout, err = run(["run", inputs["plan"], "--config", config, "-o", out, "--batch-size", 4,
                             "--disable-tqdm"], capsys)
    assert code == 0, err
    record = json.loads((out / "run.json").read_text())
    targs = record["training_arguments"]
    assert targs["load_best_model_at_end"] is True and targs["metric_for_best_model"] == "eval_loss"
    assert targs["run_name"] == "gora-best" and targs["warmup_steps"] == 1 and targs["report_to"] == []
    assert record["settings"]["training_arguments"]["run_name"] == "gora-best"
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] is not None  # transformers tracked the best checkpoint


def test_save_strategy_no_keeps_no_checkpoint_but_saves_the_adapter(inputs, tmp_path):
    out = tmp_path / "run"
    result = train(inputs["plan"], TrainSettings(max_steps=2, output_dir=str(out), report_to="none",
                                                 save_strategy="no", **FAST))
    assert not list(out.glob("checkpoint-*"))
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(("content", "fragment"), [
    ({"eval_strategy": "sometimes"}, "invalid training arguments: sometimes is not a valid IntervalStrategy"),
    ({"warmup_stepz": 3}, "did you mean 'warmup_steps'"),
    ({"load_best_model_at_end": True, "save_strategy": "no"}, "invalid training arguments: "),
])
def test_a_bad_training_argument_is_one_sentence(content, fragment, inputs, tmp_path, capsys, cli_env):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"max_steps": 1, **content}))
    code, _, err = run(["run", inputs["plan"], "--config", config, "-o", tmp_path / "run"], capsys)
    assert code == 2, err
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("Error: ") and fragment in last and "Traceback" not in err, err
    assert not (tmp_path / "run" / "run.json").exists()  # refused before any work


def test_callbacks_reach_the_trainer(inputs, tmp_path):
    settings = TrainSettings(max_steps=40, eval_steps=2, save_steps=2, load_best_model_at_end=True,
                             metric_for_best_model="eval_loss", output_dir=str(tmp_path / "run"), report_to="none",
                             **FAST)
    # patience 1 and a threshold no eval can beat: training stops at the first eval after the first one
    stop = EarlyStoppingCallback(early_stopping_patience=1, early_stopping_threshold=10.0)
    result = train(inputs["plan"], settings, callbacks=[stop])
    assert result.metrics["global_step"] < 40
    assert result.record["status"] == "completed"


def test_training_arguments_cannot_move_the_run_folder():
    with pytest.raises(ValueError, match="set the run folder with output_dir"):
        TrainSettings(training_arguments={"output_dir": "elsewhere"})
