"""`gorafit run` on the command line: a working run with a config file and flags on top, and bad input
answered with one sentence and exit code 2."""

import json

import pytest
import torch
import yaml

from gorafit.cli import cli
from tests.cli_runner import run_command
from tests.gorafit.test_train import make_run_inputs
from tests.tiny import make_tokenizer, tiny_llama

FAST = ["--batch-size", 4, "--logging-steps", 1, "--disable-tqdm", "--report-to", "none", "--eval-fraction", 0.1]




@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_run_inputs(tmp_path_factory.mktemp("cli"), "causal-lm", n=80)


def run(args, capsys):
    return run_command(cli, args, capsys)


def assert_one_sentence(code, err, *fragments):
    """Exit code 2 and, after any progress bars, one line ``Error: ...`` naming the problem; no traceback."""
    assert code == 2, err
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("Error: ") and err.count("Error: ") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in last, err


def test_run_with_config_file_and_flags_on_top(inputs, tmp_path, capsys, cli_env):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"max_steps": 2, "lr": 2e-3, "lr-ratio": 4, "save_steps": 1}))
    out = tmp_path / "run"
    code, stdout, err = run(["run", inputs["plan"], "--config", config, "--max-steps", 3, "-o", out, *FAST], capsys)
    assert code == 0, err
    assert "warning: every lora_B trains at 0.003 (lr 0.002 x lr-ratio 1.5)" in err  # B capped; lr above 1e-3
    assert "trained: 3 steps" in stdout and f"adapter: {out / 'adapter'}" in stdout
    record = json.loads((out / "run.json").read_text())
    assert record["global_step"] == 3  # the flag beat the file
    assert record["settings"]["learning_rate"] == 2e-3 and record["settings"]["lr_ratio"] == 4  # the file's
    assert record["settings"]["lr_b_max"] == 3e-3 and record["lora_B_learning_rate"] == pytest.approx(3e-3)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    # a second run into the same folder is refused; --overwrite replaces the run
    code, _, err = run(["run", inputs["plan"], "--max-steps", 1, "-o", out, *FAST], capsys)
    assert_one_sentence(code, err, "holds another run", "--resume", "--overwrite")
    code, _, err = run(["run", inputs["plan"], "--max-steps", 1, "-o", out, "--overwrite", *FAST], capsys)
    assert code == 0, err
    assert "warning" not in err  # the defaults (lr 3.16e-4, ratio 16, B capped at 3e-3) lie inside them
    assert json.loads((out / "run.json").read_text())["global_step"] == 1
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]  # the old run's are gone


def test_plan_for_another_model(inputs, tmp_path, capsys, cli_env):
    other = tiny_llama(vocab_size=len(make_tokenizer()))
    with torch.no_grad():
        other.model.layers[1].self_attn.v_proj.weight.add_(0.01)
    other.save_pretrained(tmp_path / "other")
    make_tokenizer().save_pretrained(tmp_path / "other")
    code, _, err = run(["run", inputs["plan"], "--model", tmp_path / "other", "-o", tmp_path / "run", *FAST], capsys)
    assert_one_sentence(code, err, "model.layers.1.self_attn.v_proj", "differs")
    # a model with other layers altogether
    small = tiny_llama(vocab_size=len(make_tokenizer()), layers=1)
    small.save_pretrained(tmp_path / "small")
    make_tokenizer().save_pretrained(tmp_path / "small")
    code, _, err = run(["run", inputs["plan"], "--model", tmp_path / "small", "-o", tmp_path / "run", *FAST], capsys)
    assert_one_sentence(code, err, "model.layers.1.self_attn")


def test_corrupted_or_missing_plan(inputs, tmp_path, capsys, cli_env):
    data = inputs["plan"].read_bytes()
    flipped = tmp_path / "flipped.gora"
    flipped.write_bytes(data[:-9] + bytes([data[-9] ^ 1]) + data[-8:])
    code, _, err = run(["run", flipped, "-o", tmp_path / "run"], capsys)
    assert_one_sentence(code, err, "corrupted")
    truncated = tmp_path / "truncated.gora"
    truncated.write_bytes(data[: len(data) // 2])
    code, _, err = run(["run", truncated, "-o", tmp_path / "run"], capsys)
    assert_one_sentence(code, err, str(truncated))
    code, _, err = run(["run", tmp_path / "missing.gora"], capsys)
    assert_one_sentence(code, err, "does not exist")


def test_data_missing_the_needed_columns(inputs, tmp_path, capsys, cli_env):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "the cat", "answer": "sat"}\n' * 20)
    code, _, err = run(["run", inputs["plan"], "--data", bad, "-o", tmp_path / "run", *FAST], capsys)
    assert_one_sentence(code, err, "question, answer", "prompt and completion")
    assert not (tmp_path / "run" / "run.json").exists()


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ({"learning_rat": 1e-3}, ["unknown setting 'learning_rat'", "did you mean 'learning_rate'"]),
        ({"lr": -1}, ["invalid training settings", "learning_rate"]),
        ({"bf16": True, "fp16": True}, ["bf16 and fp16"]),
        ({"resume": True, "overwrite": True}, ["resume and overwrite_output_dir"]),
        ({"fsdp": "full_shard sideways"}, ["unknown fsdp option 'sideways'"]),
        (["max_steps", 3], ["must hold a mapping"]),
    ],
)
def test_bad_config_file(content, fragments, inputs, tmp_path, capsys, cli_env):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(content))
    code, _, err = run(["run", inputs["plan"], "--config", config, "-o", tmp_path / "run"], capsys)
    assert_one_sentence(code, err, *fragments)


def test_resume_without_a_checkpoint(inputs, tmp_path, capsys, cli_env):
    code, _, err = run(["run", inputs["plan"], "--resume", "-o", tmp_path / "run"], capsys)
    assert_one_sentence(code, err, "no complete checkpoint")


def test_help_lists_the_training_arguments_names(capsys):
    code, out, _ = run(["run", "--help"], capsys)
    assert code == 0
    for option in ("--learning-rate", "--lr-ratio", "--num-train-epochs", "--per-device-train-batch-size",
                   "--gradient-accumulation-steps", "--warmup-ratio", "--lr-scheduler-type", "--resume",
                   "--fsdp", "--deepspeed", "--config", "--eval-data"):
        assert option in out
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and "run" in out


@pytest.mark.parametrize("lr,ratio,cap,warns", [(1e-4, 16, 5e-3, False), (3e-4, 16, 5e-3, False),
                                                (1e-3, 16, 5e-3, False), (1e-3, 16, None, True),
                                                (1e-3, 1, None, False), (3e-3, 1, 5e-3, True), (2e-3, 4, None, True)])
def test_learning_rate_warning_follows_the_measured_stable_range(lr, ratio, cap, warns):
    from gorafit.settings import TrainSettings, learning_rate_warning

    warning = learning_rate_warning(TrainSettings(learning_rate=lr, lr_ratio=ratio, lr_b_max=cap))
    assert (warning is not None) == warns
    if warns:
        assert "lower --lr" in warning and "REPORT.md" in warning


@pytest.mark.parametrize("lr,ratio,cap,expected", [(1e-4, 16, 5e-3, 16), (3e-4, 16, 5e-3, 16), (1e-3, 16, 5e-3, 5),
                                                   (3e-3, 16, 5e-3, 5 / 3), (1e-2, 16, 5e-3, 1), (1e-2, 0.5, 5e-3, 0.5),
                                                   (1e-3, 16, None, 16)])
def test_the_cap_on_lora_b_learning_rate(lr, ratio, cap, expected):
    from gorafit.optim import effective_lr_ratio

    assert effective_lr_ratio(lr, ratio, cap) == pytest.approx(expected)


def test_lr_b_max_none_on_the_command_line_removes_the_cap(inputs, tmp_path, capsys, cli_env):
    out = tmp_path / "run"
    code, _, err = run(["run", inputs["plan"], "--max-steps", 1, "--lr", 1e-3, "--lr-b-max", "none", "-o", out, *FAST],
                       capsys)
    assert code == 0, err
    assert "warning: every lora_B trains at 0.016" in err
    record = json.loads((out / "run.json").read_text())
    assert record["settings"]["lr_b_max"] is None and record["lora_B_learning_rate"] == pytest.approx(1.6e-2)
    code, _, err = run(["run", inputs["plan"], "--lr-b-max", "lots", "-o", tmp_path / "r2", *FAST], capsys)
    assert_one_sentence(code, err, "'lots' is neither a number nor 'none'")
