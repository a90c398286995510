"""gorafit.train: LoRA+ groups, the schedule, the run folder, resuming a killed run exactly, and (slow)
training that lowers the eval loss of a real model on real data."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainingArguments

import goraplan
from gorafit import GoraTrainer, TrainSettings, apply_plan, run_folder, train
from gorafit.adapter_check import check_saved_adapter
from gorafit.optim import lora_plus_param_groups
from gorafit.run_folder import last_complete_checkpoint
from gorafit.training_args import deepspeed_config_path, fsdp_arguments
from goraplan.errors import GoraError
from tests.tiny import WORDS, make_tokenizer, random_batches, sentences, tiny_bert_cls, tiny_llama

LABELS = ["neg", "pos"]




# ---------------------------------------------------------------------------------------------------- inputs
def make_run_inputs(root: Path, task: str = "causal-lm", n: int = 160) -> dict[str, Path]:
    """A saved tiny model (with tokenizer), a jsonl data set and a plan built on both, under ``root``.

    causal-lm: prompt/completion rows (the completion repeats the prompt's first word); seq-cls:
    text/label rows (pos when the first word is in the first half of the vocabulary).
    """
    from goraplan.data import PaddingCollator, make_batches, prepare
    from goraplan.models import load_model

    root.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    model = tiny_llama(vocab_size=len(tok)) if task == "causal-lm" else tiny_bert_cls(vocab_size=len(tok))
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    first_half = set(WORDS[: len(WORDS) // 2])
    rows = []
    for s in sentences(n, seed=3):
        first = s.split()[0]
        if task == "causal-lm":
            rows.append({"prompt": s + " :", "completion": " " + first})
        else:
            rows.append({"text": s, "label": LABELS[first in first_half]})
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    labels = LABELS if task == "seq-cls" else None
    model, tok = load_model(str(model_dir), task, label_names=labels)
    ds, _ = prepare(str(data), tok, task, max_length=32, label_names=labels)
    batches = make_batches(ds, PaddingCollator(tok, task), 4, 4)
    settings = goraplan.PlanSettings(task=task, steps=4, rank=4, batch_size=4, max_length=32)
    plan = goraplan.build_plan(model, batches, settings, model_name=str(model_dir), data_source=str(data),
                               data_split="train", labels=labels)
    plan.save(root / "plan.gora")
    return {"model": model_dir, "data": data, "plan": root / "plan.gora"}


@pytest.fixture(scope="session")
def causal_inputs(tmp_path_factory):
    return make_run_inputs(tmp_path_factory.mktemp("causal"), "causal-lm")


@pytest.fixture(scope="session")
def cls_inputs(tmp_path_factory):
    return make_run_inputs(tmp_path_factory.mktemp("cls"), "seq-cls")


def gorafit_command(*args) -> list[str]:
    return [sys.executable, "-m", "gorafit", *[str(a) for a in args]]


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ---------------------------------------------------------------------------------------------------- LoRA+
@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
def test_optimizer_gives_every_lora_b_ratio_times_the_lr(task, tmp_path):
    model = tiny_llama() if task == "causal-lm" else tiny_bert_cls()
    batches = random_batches(4)
    if task == "seq-cls":
        for b in batches:
            b["labels"] = b["input_ids"][:, 0] % 2
    plan = goraplan.build_plan(model, batches, goraplan.PlanSettings(task=task, steps=4, rank=4))
    peft_model = apply_plan(model, plan)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-4, weight_decay=0.01, report_to=[])
    trainer = GoraTrainer(model=peft_model, args=args, lr_ratio=16)
    optimizer = trainer.create_optimizer()

    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    named = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(lr_of) == len(named)  # every trainable parameter is in exactly one group
    n_a = n_b = n_head = 0
    for name, param in named.items():
        if ".lora_B." in name:
            assert lr_of[id(param)] == pytest.approx(16 * 3e-4), name
            n_b += 1
        else:
            assert lr_of[id(param)] == pytest.approx(3e-4), name
            n_a += ".lora_A." in name
            n_head += "classifier" in name
        assert decay_of[id(param)] == (0.0 if name.endswith("bias") else 0.01), name
    assert n_a == n_b == len(plan.manifest.modules)
    assert (n_head > 0) == (task == "seq-cls")  # the head trains, at the base lr
    assert isinstance(optimizer, torch.optim.AdamW)


def test_schedule_is_cosine_with_warmup_and_keeps_the_ratio(tmp_path):
    model = tiny_llama()
    plan = goraplan.build_plan(model, random_batches(4), goraplan.PlanSettings(steps=4, rank=4))
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, warmup_steps=0.03,
                             lr_scheduler_type="cosine", report_to=[])
    trainer = GoraTrainer(model=apply_plan(model, plan), args=args, lr_ratio=4)
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append([g["lr"] for g in trainer.optimizer.param_groups])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert lrs[0][0] == 0 and lrs[3][0] == pytest.approx(1e-3)  # 3 warmup steps of 100, then the peak
    assert lrs[50][0] == pytest.approx(1e-3 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 47 / 97)).item()))
    for step in range(1, 100):
        a, b = lrs[step][0], lrs[step][-1]
        assert b == pytest.approx(4 * a)


def test_lora_plus_groups_need_trainable_parameters():
    with pytest.raises(GoraError, match="no trainable parameters"):
        lora_plus_param_groups(torch.nn.Linear(2, 2).requires_grad_(False), 1e-3, 16, 0.0)


# ---------------------------------------------------------------------------------------------------- run folder
def test_run_folder_holds_adapter_checkpoints_logs_and_record(causal_inputs, tmp_path):
    out = tmp_path / "run"
    settings = TrainSettings(max_steps=6, per_device_train_batch_size=4, save_steps=3, logging_steps=2,
                             eval_steps=3, learning_rate=1e-3, output_dir=str(out), report_to="none",
                             disable_tqdm=True)
    result = train(causal_inputs["plan"], settings)
    plan = goraplan.load_plan(causal_inputs["plan"])

    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    shapes = check_saved_adapter(out / "adapter", plan)
    assert len([k for k in shapes if ".lora_" in k]) == 2 * len(plan.manifest.modules)
    assert not (out / "adapter" / "training_args.bin").exists()  # no pickle beside the adapter
    run_of_adapter = run_folder.run_of_adapter(out / "adapter")  # the adapter leads to its run and plan
    assert run_of_adapter == out and run_folder.plan_sha256(run_folder.read_record(out)) == plan.sha256

    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "completed" and record["plan"]["sha256"] == plan.sha256
    assert record["settings"]["data"] == str(causal_inputs["data"])  # resolved from the plan
    assert record["settings"]["model"] == str(causal_inputs["model"])
    assert record["settings"]["lr_ratio"] == 16 and record["settings"]["warmup_ratio"] == 0.03
    assert record["training_arguments"]["lr_scheduler_type"] == "cosine"
    assert record["versions"]["torch"] == torch.__version__ and record["versions"]["peft"]
    assert record["wall_time_s"] > 0 and record["peak_memory_mb"] > 0
    assert record["parallelism"]["mode"] == "single"
    metrics = record["metrics"]
    assert metrics == result.metrics and metrics["global_step"] == 6
    assert metrics["eval_loss_start"] is not None and metrics["eval_loss"] is not None
    assert metrics["train_loss"] is not None

    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("loss" in e for e in log) and any("eval_loss" in e and e["step"] == 0 for e in log)

    # the saved adapter is the trained model: reload it over the base and compare outputs
    from peft import PeftModel

    from goraplan.models import load_model

    base, _ = load_model(str(causal_inputs["model"]), "causal-lm")
    reloaded = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    for m in plan.manifest.modules:
        layer = reloaded.get_base_model().get_submodule(m.name)
        assert layer.lora_A["default"].weight.shape == (m.rank, m.shape[1])
        assert not torch.equal(layer.lora_B["default"].weight, plan.lora_b(m.name))  # it trained


def test_classification_run_reports_accuracy_and_saves_the_head(cls_inputs, tmp_path):
    out = tmp_path / "run"
    settings = TrainSettings(max_steps=4, per_device_train_batch_size=8, save_steps=4, learning_rate=1e-3,
                             eval_fraction=0.2, output_dir=str(out), report_to="none", disable_tqdm=True)
    result = train(cls_inputs["plan"], settings)
    assert 0 <= result.metrics["eval_accuracy"] <= 1 and "eval_accuracy_start" in result.metrics
    tensors = adapter_tensors(out)
    assert "base_model.model.classifier.weight" in tensors
    record = json.loads((out / "run.json").read_text())
    assert run_folder.label_names(record) == LABELS and record["data"]["label_names"] == LABELS


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_logs_when_installed(causal_inputs, tmp_path):
    out = tmp_path / "run"
    train(causal_inputs["plan"], TrainSettings(max_steps=2, logging_steps=1, save_steps=2, output_dir=str(out),
                                               disable_tqdm=True))  # report_to: auto
    assert list((out / "runs").rglob("events.out.tfevents.*"))
    assert json.loads((out / "run.json").read_text())["training_arguments"]["report_to"] == ["tensorboard"]


def test_check_saved_adapter_refuses_an_empty_or_sharded_save(causal_inputs, tmp_path):
    plan = goraplan.load_plan(causal_inputs["plan"])
    folder = tmp_path / "adapter"
    folder.mkdir()
    with pytest.raises(GoraError, match="was not saved"):
        check_saved_adapter(folder, plan)
    full = {}
    for m in plan.manifest.modules:
        full[f"base_model.model.{m.name}.lora_A.weight"] = plan.lora_a(m.name)
        full[f"base_model.model.{m.name}.lora_B.weight"] = plan.lora_b(m.name)
    save_file(full, str(folder / "adapter_model.safetensors"))
    check_saved_adapter(folder, plan)
    # ZeRO-3 without gathering writes empty placeholders; FSDP without a full state dict writes shards
    first = plan.manifest.modules[0].name
    for broken in ({**full, f"base_model.model.{first}.lora_A.weight": torch.empty(0)},
                   {**full, f"base_model.model.{first}.lora_B.weight": plan.lora_b(first)[:1].contiguous()},
                   {k: v for k, v in full.items() if not k.endswith("lora_B.weight")}):
        save_file(broken, str(folder / "adapter_model.safetensors"))
        with pytest.raises(GoraError, match="incomplete"):
            check_saved_adapter(folder, plan)
    save_file(full, str(folder / "adapter_model.safetensors"))
    with pytest.raises(GoraError, match="head classifier is missing"):
        check_saved_adapter(folder, plan, head="classifier")


# ---------------------------------------------------------------------------------------------------- resume
def test_killed_run_resumed_ends_with_the_same_adapter(cls_inputs, tmp_path):
    """Really kill the process (SIGKILL) after its first checkpoint; resuming must give the adapter of a
    run that was never interrupted. BERT has dropout, so the random state is restored too."""
    common = ["run", cls_inputs["plan"], "--max-steps", 60, "--batch-size", 8, "--save-steps", 5,
              "--logging-steps", 5, "--eval-fraction", 0.1, "--eval-steps", 20, "--lr", 1e-3,
              "--disable-tqdm", "--report-to", "none"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    done = subprocess.run(gorafit_command(*common, "-o", full), env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(gorafit_command(*common, "-o", killed), env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while last_complete_checkpoint(killed) is None:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (killed / "adapter").exists(), "the run finished before it was killed; the test proves nothing"
    step = int(last_complete_checkpoint(killed).name.split("-")[1])
    assert step < 60

    # without --resume the folder is refused; with it the run continues
    refused = subprocess.run(gorafit_command(*common, "-o", killed), env=subprocess_env(), capture_output=True,
                             text=True)
    assert refused.returncode == 2 and "holds another run" in refused.stderr
    resumed = subprocess.run(gorafit_command(*common, "-o", killed, "--resume"), env=subprocess_env(),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    difference = max_difference(adapter_tensors(full), adapter_tensors(killed))
    print(f"killed at checkpoint-{step}, resumed; max |adapter difference| = {difference:.3g}")
    assert difference <= 1e-6
    record = json.loads((killed / "run.json").read_text())
    assert record["resumed_from"].endswith(f"checkpoint-{step}") and record["global_step"] == 60
    full_record = json.loads((full / "run.json").read_text())
    assert record["metrics"]["eval_loss"] == pytest.approx(full_record["metrics"]["eval_loss"], abs=1e-6)
    steps = [json.loads(line)["step"] for line in (killed / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # log lines written after the checkpoint, before the kill, are gone


def test_resume_needs_a_checkpoint_and_the_same_plan(causal_inputs, cls_inputs, tmp_path):
    with pytest.raises(GoraError, match="no complete checkpoint"):
        train(causal_inputs["plan"], TrainSettings(resume=True, output_dir=str(tmp_path / "none")))
    partial = tmp_path / "run" / "checkpoint-5"
    partial.mkdir(parents=True)
    assert last_complete_checkpoint(tmp_path / "run") is None  # a checkpoint cut short by a kill is skipped
    (partial / "trainer_state.json").write_text("{}")
    (partial / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "run" / "run.json").write_text(json.dumps({"plan": {"sha256": "0" * 64}}))
    with pytest.raises(GoraError, match="another plan"):
        train(causal_inputs["plan"], TrainSettings(resume=True, output_dir=str(tmp_path / "run")))


# ---------------------------------------------------------------------------------------------------- launchers
def test_shipped_deepspeed_configs_keep_the_lora_plus_groups_and_gather_zero3():
    import importlib.resources

    folder = importlib.resources.files("gorafit") / "configs"
    for name in ("zero2", "zero3"):
        config = json.loads((folder / f"{name}.json").read_text())
        assert "optimizer" not in config  # the Trainer's optimizer (our LoRA+ groups) is the one DeepSpeed wraps
        assert config["zero_optimization"]["stage"] == int(name[-1])
    zero3 = json.loads((folder / "zero3.json").read_text())["zero_optimization"]
    assert zero3["stage3_gather_16bit_weights_on_model_save"] is True


def test_deepspeed_configs_that_would_lose_groups_or_the_adapter_are_refused(tmp_path):
    with_optimizer = tmp_path / "opt.json"
    with_optimizer.write_text(json.dumps({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}}))
    with pytest.raises(GoraError, match="optimizer block"):
        deepspeed_config_path(str(with_optimizer))
    no_gather = tmp_path / "z3.json"
    no_gather.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(GoraError, match="stage3_gather_16bit_weights_on_model_save"):
        deepspeed_config_path(str(no_gather))
    with pytest.raises(GoraError, match="does not exist"):
        deepspeed_config_path(str(tmp_path / "missing.json"))


def test_fsdp_options_become_fsdp2_with_a_full_state_dict(tmp_path):
    assert fsdp_arguments(None, None) == (False, None)
    enabled, config = fsdp_arguments("full_shard", None)
    assert enabled and config == {"version": 2, "state_dict_type": "FULL_STATE_DICT"}
    _, config = fsdp_arguments("shard_grad_op offload", {"fsdp_activation_checkpointing": True})
    assert config["cpu_offload"] and config["reshard_after_forward"] is False and config["activation_checkpointing"]
    with pytest.raises(GoraError, match="FULL_STATE_DICT"):
        fsdp_arguments("full_shard", {"state_dict_type": "SHARDED_STATE_DICT"})


def test_fsdp_on_one_cpu_process_is_an_error_not_a_silent_fallback(causal_inputs, tmp_path):
    settings = TrainSettings(max_steps=1, fsdp="full_shard", output_dir=str(tmp_path / "run"), report_to="none")
    with pytest.raises(GoraError, match="--fsdp needs several processes on GPUs"):
        train(causal_inputs["plan"], settings)


# ---------------------------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_training_lowers_the_eval_loss_of_minilm_on_sarcasm(tmp_path):
    from goraplan.data import SARCASM_LABELS, PaddingCollator, make_batches, prepare
    from goraplan.models import load_model

    model, tok = load_model("minilm-l6", "seq-cls", label_names=SARCASM_LABELS)
    ds, _ = prepare("sarcasm", tok, "seq-cls", max_length=64, limit=64)
    batches = make_batches(ds, PaddingCollator(tok, "seq-cls"), 8, 8, source="sarcasm")
    settings = goraplan.PlanSettings(task="seq-cls", rank=8, steps=8, batch_size=8, max_length=64)
    plan = goraplan.build_plan(model, batches, settings, model_name="minilm-l6", data_source="sarcasm",
                               data_split="train", labels=SARCASM_LABELS)
    del model

    result = train(plan, TrainSettings(
        max_train_samples=480, eval_data="sarcasm", eval_split="test", max_eval_samples=256,
        num_train_epochs=1, per_device_train_batch_size=16, learning_rate=2e-4, eval_steps=10,
        output_dir=str(tmp_path / "run"), report_to="none", disable_tqdm=True,
    ))
    m = result.metrics
    print(f"eval loss {m['eval_loss_start']:.4f} -> {m['eval_loss']:.4f}, "
          f"accuracy {m['eval_accuracy_start']:.3f} -> {m['eval_accuracy']:.3f}")
    assert m["global_step"] == 30
    assert m["eval_loss"] < m["eval_loss_start"] - 0.03
    assert m["eval_accuracy"] > 0.5
