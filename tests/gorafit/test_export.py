"""gorafit export / verify: exports reload exactly, obey vLLM's rules, and bad input is one clear sentence.

Fast tests run on tiny models built from configs; the `slow` ones on SmolLM2-135M (and vLLM, when a
serving environment with it exists: ``.venv-serve/bin/python`` or ``$GORA_VLLM_PYTHON``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from gorafit import export as export_mod
from gorafit import run_folder
from gorafit.cli_export import export_cmd, verify_cmd
from gorafit.export import export_merged, export_onnx, export_peft
from gorafit.saved_adapter import fold_scalings, module_ranks, module_scalings, read_adapter
from gorafit.verify import verify
from gorafit.vllm_serving import VLLM_MAX_LORA_RANKS, check_vllm_compatible, smallest_max_lora_rank
from goraplan.cli_support import run_cli
from goraplan.errors import GoraError
from tests.tiny import make_tokenizer, tiny_bert_cls, tiny_llama

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ["q_proj", "v_proj", "down_proj"]
HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))


# ---------------------------------------------------------------------------------------------------
# Fixtures: a saved tiny base and trained-looking GoRA adapters over it (heterogeneous ranks, rsLoRA,
# random non-zero B so the adapter changes the outputs).


def _make_adapter(model: torch.nn.Module, out: Path, targets: list[str], task_type: str,
                  modules_to_save: list[str] | None = None, seed: int = 0) -> PeftModel:
    torch.manual_seed(seed)
    names = [n for n, _ in model.named_modules() if n.split(".")[-1] in targets]
    ranks = [2, 5, 8, 3, 12, 6, 4, 9]
    config = LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, target_modules=targets, init_lora_weights=True, task_type=task_type,
        rank_pattern={re.escape(n): ranks[i % len(ranks)] for i, n in enumerate(names)},
        modules_to_save=modules_to_save,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
            elif "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.1)
    peft_model.eval()
    peft_model.save_pretrained(out)
    return peft_model


@pytest.fixture(scope="module")
def export_base_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("export-base")
    tokenizer = make_tokenizer()
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def export_adapter(export_base_dir, tmp_path_factory) -> tuple[Path, PeftModel]:
    """A causal-LM adapter inside a run folder (RUN/adapter + RUN/run.json), and the in-memory source model."""
    run = tmp_path_factory.mktemp("export-run")
    base = AutoModelForCausalLM.from_pretrained(export_base_dir, dtype=torch.float32)
    model = _make_adapter(base, run / "adapter", TARGETS, "CAUSAL_LM")
    run_folder.write_record(run, {"plan": {"sha256": "ab" * 32}, "settings": {"learning_rate": 1e-3}})
    return run, model


@pytest.fixture(scope="module")
def export_ids() -> torch.Tensor:
    return torch.randint(3, 40, (2, 9), generator=torch.Generator().manual_seed(3))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


def _reload(base_dir: Path, adapter_dir: Path, cls=AutoModelForCausalLM, **kwargs):
    return PeftModel.from_pretrained(cls.from_pretrained(base_dir, dtype=torch.float32, **kwargs), adapter_dir).eval()


# ---------------------------------------------------------------------------------------------------
# peft export: native and legacy reload exactly


def test_native_export_reloads_exactly(export_base_dir, export_adapter, export_ids, tmp_path):
    run, source = export_adapter
    result = export_peft(run, tmp_path / "native")
    reloaded = _reload(export_base_dir, tmp_path / "native")
    expected = _logits(source, export_ids)
    with source.disable_adapter():
        assert (_logits(source, export_ids) - expected).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(_logits(reloaded, export_ids), expected, atol=1e-5, rtol=0)
    assert result.problems == []
    assert sorted(set(result.ranks.values())) == [2, 3, 5, 6, 8, 12]


def test_legacy_export_gives_the_same_outputs(export_base_dir, export_adapter, export_ids, tmp_path):
    run, source = export_adapter
    export_peft(run, tmp_path / "native")
    export_peft(run, tmp_path / "legacy", vllm_legacy=True)
    native = _logits(_reload(export_base_dir, tmp_path / "native"), export_ids)
    legacy_model = _reload(export_base_dir, tmp_path / "legacy")
    torch.testing.assert_close(_logits(legacy_model, export_ids), native, atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(legacy_model, export_ids), _logits(source, export_ids), atol=1e-5, rtol=0)

    config = json.loads((tmp_path / "legacy" / "adapter_config.json").read_text())
    assert config["use_rslora"] is False
    assert config["r"] == config["lora_alpha"] == 12
    assert config["rank_pattern"] == config["alpha_pattern"]
    # Every scaling is 1: in PEFT's own layers, and for a server that ignores the patterns (alpha / r).
    scalings = [layer.scaling["default"] for layer in legacy_model.modules() if hasattr(layer, "scaling")
                and isinstance(layer.scaling, dict) and "default" in layer.scaling]
    assert scalings and all(s == 1.0 for s in scalings)
    assert config["lora_alpha"] / config["r"] == 1.0


def test_fold_scalings_is_pure_and_exact(export_adapter):
    run, _ = export_adapter
    config, tensors, _ = read_adapter(run / "adapter")
    before = {k: v.clone() for k, v in tensors.items()}
    ranks = module_ranks(config, tensors)
    legacy_config, legacy = fold_scalings(config, tensors)
    for module, rank in ranks.items():
        key = f"base_model.model.{module}.lora_B.weight"
        torch.testing.assert_close(legacy[key], before[key] * (8 / math.sqrt(rank)), atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(legacy[key.replace("lora_B", "lora_A")], before[key.replace("lora_B", "lora_A")])
    assert all(torch.equal(tensors[k], before[k]) for k in tensors)  # inputs untouched
    assert config["use_rslora"] is True
    assert set(module_scalings(legacy_config, ranks).values()) == {1.0}


def test_module_scalings_follow_peft():
    ranks = {"model.layers.0.q_proj": 4, "model.layers.1.q_proj": 16}
    assert module_scalings({"lora_alpha": 8, "use_rslora": True}, ranks) == {
        "model.layers.0.q_proj": 4.0, "model.layers.1.q_proj": 2.0}
    assert module_scalings({"lora_alpha": 8, "alpha_pattern": {r"model\.layers\.1\.q_proj": 32}}, ranks) == {
        "model.layers.0.q_proj": 2.0, "model.layers.1.q_proj": 2.0}


def test_export_records_provenance_and_card(export_adapter, tmp_path):
    run, _ = export_adapter
    result = export_peft(run, tmp_path / "out")
    record = json.loads((tmp_path / "out" / "gora_export.json").read_text())
    assert record["plan_sha256"] == "ab" * 32
    assert record["source_adapter"] == str((run / "adapter").resolve())
    assert record["max_lora_rank"] == 16
    card = (tmp_path / "out" / "README.md").read_text()
    assert "ab" * 32 in card and "--max-lora-rank 16" in card and "learning_rate" in card
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "pt") as handle:
        assert handle.metadata()["gora.plan_sha256"] == "ab" * 32
    assert result.serve_command("B").endswith(f"--max-lora-rank 16 --lora-target-modules down_proj q_proj v_proj "
                                              f"--lora-modules out={tmp_path / 'out'}")


def test_serve_command_pins_the_recorded_revision_and_quotes_words_from_the_file(export_adapter, tmp_path):
    import shlex
    import shutil

    run, _ = export_adapter
    adapter = tmp_path / "adapter"
    shutil.copytree(run / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(base_model_name_or_path="org/m; rm -rf ~", revision="0123abc")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    result = export_peft(adapter, tmp_path / "out")
    words = shlex.split(result.serve_command())
    assert words[words.index("--model") + 1] == "org/m; rm -rf ~"  # one inert word, however it is spelt
    assert words[words.index("--revision") + 1] == "0123abc"
    assert "--revision" not in result.serve_command("other/base")  # the commit belongs to the recorded base only
    config.update(revision="main\x1b[2J\nrm -rf ~")  # escape codes and a line break in the recorded commit
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    printed = export_peft(adapter, tmp_path / "out2").serve_command()
    assert "\x1b" not in printed and "\n" not in printed and len(shlex.split(printed)) == len(words)


def test_string_init_is_written_as_true(export_adapter, tmp_path):
    run, _ = export_adapter
    adapter = tmp_path / "gora-init"
    adapter.mkdir()
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(dict(config, init_lora_weights="gora")))
    (adapter / "adapter_model.safetensors").write_bytes((run / "adapter" / "adapter_model.safetensors").read_bytes())
    assert check_vllm_compatible(json.loads((adapter / "adapter_config.json").read_text()))
    export_peft(adapter, tmp_path / "out")
    exported = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert exported["init_lora_weights"] is True
    assert check_vllm_compatible(exported, 16) == []


# ---------------------------------------------------------------------------------------------------
# merged and ONNX


def test_merged_matches_adapter(export_base_dir, export_adapter, export_ids, tmp_path):
    run, source = export_adapter
    export_merged(run, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(merged, export_ids), _logits(source, export_ids), atol=1e-4, rtol=0)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_merged_bfloat16_writes_bfloat16(export_adapter, tmp_path):
    run, _ = export_adapter
    export_merged(run, tmp_path / "merged", dtype="bfloat16")
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as handle:
        key = next(k for k in handle.keys() if k.endswith("q_proj.weight"))  # noqa: SIM118
        assert handle.get_tensor(key).dtype == torch.bfloat16


@pytest.mark.skipif(not HAS_ONNX, reason="onnx, onnxscript and onnxruntime are not installed (pip install 'goraplan[onnx]')")
def test_onnx_matches_torch(export_adapter, tmp_path):
    import numpy as np
    import onnxruntime

    run, source = export_adapter
    export_onnx(run, tmp_path / "onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    for shape in [(3, 11), (1, 4)]:  # neither is the traced (2, 8): the axes are dynamic
        ids = torch.randint(3, 40, shape, generator=torch.Generator().manual_seed(shape[1]))
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones(shape, dtype=np.int64)})[0]
        torch.testing.assert_close(torch.from_numpy(got), _logits(source, ids), atol=1e-4, rtol=0)
    report = verify(tmp_path / "onnx", engine="onnx", prompts=["the cat sat on", "a dog ran"], max_new_tokens=4)
    assert report.ok, report.summary()


def test_onnx_without_the_extra_names_it(export_adapter, tmp_path, monkeypatch):
    run, _ = export_adapter
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "onnxscript" else real_find_spec(name, *a, **k))
    with pytest.raises(GoraError, match=r"onnxscript: pip install 'goraplan\[onnx\]'"):
        export_onnx(run, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


# ---------------------------------------------------------------------------------------------------
# Classification adapters carry their head


@pytest.mark.parametrize("kind", ["llama-score", "bert-classifier"])
def test_classification_adapter_exports_with_head(kind, tmp_path):
    tokenizer = make_tokenizer()
    base_dir = tmp_path / "base"
    if kind == "llama-score":
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
        base = LlamaForSequenceClassification(config)
        targets, head = ["q_proj", "v_proj"], "score"
    else:
        base = tiny_bert_cls(vocab_size=len(tokenizer), num_labels=3)
        targets, head = ["query", "value", "dense"], "classifier"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, dtype=torch.float32)
    source = _make_adapter(base, tmp_path / "adapter", targets, "SEQ_CLS", modules_to_save=[head])
    ids = torch.randint(3, 40, (2, 7), generator=torch.Generator().manual_seed(5))

    result = export_peft(tmp_path / "adapter", tmp_path / "native")
    export_peft(tmp_path / "adapter", tmp_path / "legacy", vllm_legacy=True)
    assert result.task == "seq-cls" and result.problems == []
    _, tensors, _ = read_adapter(tmp_path / "native")
    assert any(re.search(rf"(^|\.){head}(\.out_proj)?\.weight$", k) for k in tensors)
    expected = _logits(source, ids)
    for folder in ("native", "legacy"):
        reloaded = _reload(base_dir, tmp_path / folder, AutoModelForSequenceClassification)
        torch.testing.assert_close(_logits(reloaded, ids), expected, atol=1e-5, rtol=0)
    for folder in ("native", "legacy"):
        config = json.loads((tmp_path / folder / "adapter_config.json").read_text())
        assert check_vllm_compatible(config, 16) == []

    export_merged(tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(merged, ids), expected, atol=1e-4, rtol=0)
    report = verify(tmp_path / "merged", prompts=["the cat sat", "a dog ran fast"])
    assert report.ok and report.task == "seq-cls", report.summary()


# ---------------------------------------------------------------------------------------------------
# vLLM's acceptance rules, checked without vLLM


def _good_config() -> dict:
    return {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "bias": "none",
            "use_rslora": True, "rank_pattern": {r"model\.layers\.0\.q_proj": 24}, "init_lora_weights": True}


def test_exported_configs_pass_vllm_rules(export_adapter, tmp_path):
    run, _ = export_adapter
    for legacy in (False, True):
        result = export_peft(run, tmp_path / str(legacy), vllm_legacy=legacy)
        config = json.loads((tmp_path / str(legacy) / "adapter_config.json").read_text())
        assert check_vllm_compatible(config, smallest_max_lora_rank(result.max_rank)) == []
        assert check_vllm_compatible(config, 8) and "greater than max_lora_rank 8" in check_vllm_compatible(config, 8)[0]


_NEGATIVE_CASES = [
    ({"use_dora": True}, "DoRA"),
    ({"bias": "all"}, "bias"),
    ({"bias": "lora_only"}, "bias"),
    ({"lora_bias": True}, "lora_bias"),
    ({"modules_to_save": ["lm_head"]}, r"modules_to_save holds \['lm_head'\]"),
    ({"modules_to_save": ["score", "embed_tokens"]}, "embed_tokens"),
    ({"init_lora_weights": "gora"}, "init_lora_weights is 'gora'"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights is 'pissa'"),
    ({"rank_pattern": {"q": 40}}, "LoRA rank 40 is greater than max_lora_rank 32"),
    ({"r": 0}, "positive integer"),
    ({"layer_replication": [[0, 1]]}, "layer_replication"),
    ({"alora_invocation_tokens": [1, 2]}, "aLoRA"),
]


@pytest.mark.parametrize(("change", "message"), _NEGATIVE_CASES)
def test_vllm_rules_report_each_problem(change, message):
    config = dict(_good_config(), **change)
    problems = check_vllm_compatible(config, max_lora_rank=32)
    assert len(problems) == 1 and re.search(message, problems[0]), problems


def test_vllm_rules_accept_what_vllm_accepts():
    assert check_vllm_compatible(_good_config(), 32) == []
    assert check_vllm_compatible(dict(_good_config(), modules_to_save=["classifier"]), 32) == []
    for init in ("gaussian", "eva", "orthogonal", "mica", "lora_ga", False):
        assert check_vllm_compatible(dict(_good_config(), init_lora_weights=init), 32) == []


def test_vllm_rules_report_everything_at_once():
    config = dict(_good_config(), use_dora=True, bias="all", modules_to_save=["lm_head"])
    assert len(check_vllm_compatible(config, 16)) == 4  # dora, bias, modules_to_save, rank 24 > 16
    assert "not one vLLM accepts" in check_vllm_compatible(_good_config(), 24)[0]
    assert "lacks target_modules" in check_vllm_compatible({"r": 8, "lora_alpha": 8})[0]


def test_smallest_max_lora_rank():
    assert [smallest_max_lora_rank(r) for r in (1, 2, 8, 9, 32, 33, 257, 320, 512)] == [
        1, 8, 8, 16, 32, 64, 320, 320, 512]
    assert all(smallest_max_lora_rank(r) in VLLM_MAX_LORA_RANKS for r in range(1, 513))
    with pytest.raises(GoraError, match="above 512"):
        smallest_max_lora_rank(513)


# ---------------------------------------------------------------------------------------------------
# Bad input: one clear sentence


def test_run_folder_without_adapter(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    with pytest.raises(GoraError, match=r"run folder .* has no final adapter"):
        export_peft(tmp_path / "run", tmp_path / "out")
    with pytest.raises(GoraError, match="does not exist"):
        export_peft(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GoraError, match="holds neither adapter_config.json nor run.json"):
        export_peft(tmp_path / "empty", tmp_path / "out")


def test_existing_output_needs_overwrite(export_adapter, tmp_path):
    run, _ = export_adapter
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    for call in (lambda: export_peft(run, out), lambda: export_merged(run, out)):
        with pytest.raises(GoraError, match=r"already exists: pass --overwrite"):
            call()
    assert (out / "old.txt").read_text() == "old"
    with pytest.raises(GoraError, match=r"holds old.txt, which gorafit export did not write"):
        export_peft(run, out, overwrite=True)  # --overwrite replaces a previous export, never a user's file
    assert (out / "old.txt").read_text() == "old"
    (out / "old.txt").unlink()
    export_peft(run, out, overwrite=True)  # an empty folder
    export_peft(run, out, overwrite=True, vllm_legacy=True)  # a previous export
    assert json.loads((out / "adapter_config.json").read_text())["use_rslora"] is False
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left behind
    with pytest.raises(GoraError, match="is .*the adapter being exported"):
        export_peft(run, run / "adapter", overwrite=True)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_never_replaces_an_input_or_a_foreign_file(export_adapter, export_base_dir, tmp_path, capsys,
                                                              monkeypatch):
    """A hostile choice of -o with --overwrite: the run, its adapter, the base model, a folder holding them, or a
    folder with someone's file in it. Every one is refused with one sentence, and not one file changes."""
    monkeypatch.delenv("GORA_DEBUG", raising=False)
    source, _ = export_adapter
    run, base = tmp_path / "run", tmp_path / "base"
    shutil.copytree(source, run)
    shutil.copytree(export_base_dir, base)
    (run / "checkpoint-2").mkdir()
    (run / "checkpoint-2" / "precious.bin").write_bytes(b"step 2")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    before = _snapshot(tmp_path)
    merged = {"base": str(base)}
    refusals = [
        (export_peft, {}, run, "holds.* the adapter being exported"),
        (export_peft, {}, run / "adapter", "is .*the adapter being exported"),
        (export_peft, {}, run / "checkpoint-2", "lies inside.* the run it was trained in"),
        (export_peft, {}, tmp_path, "holds.* the adapter being exported"),
        (export_peft, {}, tmp_path / "notes", "holds mine.txt, which gorafit export did not write"),
        (export_peft, {}, base, "holds config.json, which gorafit export did not write"),
        (export_merged, merged, base, "is .*the base model"),
        (export_merged, merged, base / "merged", "lies inside.* the base model"),
        (export_merged, merged, run, "holds.* the adapter being exported"),
    ]
    (tmp_path / "link").symlink_to(tmp_path / "notes", target_is_directory=True)
    refusals.append((export_peft, {}, tmp_path / "link", "is a symbolic link"))
    for export, kwargs, out, message in refusals:
        with pytest.raises(GoraError, match=message):
            export(run, out, overwrite=True, **kwargs)
    with pytest.raises(GoraError, match="holds.* the adapter being exported"):
        export_peft(run / "adapter", tmp_path / "run", overwrite=True)  # the adapter given directly
    code, _, err = _run_cli(["export", str(run), "--format", "merged", "--base", str(base), "-o", str(base),
                             "--overwrite"], capsys)
    assert code == 2 and err.startswith("Error: output") and "Traceback" not in err
    assert _snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "link", "notes", "run"]


_KILLED_EXPORT = """
import sys, time
from gorafit import export
def stall(*args, **kwargs):
    print("staging", flush=True)
    time.sleep(600)
export.save_file = stall
export.export_peft(sys.argv[1], sys.argv[2], overwrite=True)
"""


def test_killed_export_leaves_no_staging_behind(export_adapter, tmp_path):
    """An export killed while it stages leaves a .partial folder (SIGKILL runs no cleanup, nor does SIGTERM
    without a handler); the next export of the same target removes it, and the previous export survives."""
    import signal
    import subprocess
    import sys

    run, _ = export_adapter
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    killed = {}
    for signal_name in ("SIGKILL", "SIGTERM"):  # both at once: each child spends its time importing
        (tmp_path / signal_name).mkdir()
        export_peft(run, tmp_path / signal_name / "out")
        killed[signal_name] = subprocess.Popen([sys.executable, "-c", _KILLED_EXPORT, str(run),
                                                str(tmp_path / signal_name / "out")],
                                               stdout=subprocess.PIPE, text=True, env=env)
    for signal_name, proc in killed.items():
        assert proc.stdout.readline().strip() == "staging"
        proc.send_signal(getattr(signal, signal_name))
        proc.wait(timeout=60)
        folder = tmp_path / signal_name
        leftovers = [p.name for p in folder.iterdir() if p.name != "out"]
        assert leftovers and all(name.startswith(".out.") and name.endswith(".partial") for name in leftovers)
        assert (folder / "out" / "adapter_config.json").is_file()  # the previous export is whole
        export_peft(run, folder / "out", overwrite=True, vllm_legacy=True)
        assert [p.name for p in folder.iterdir()] == ["out"]
        assert json.loads((folder / "out" / "adapter_config.json").read_text())["use_rslora"] is False


def test_base_model_code_never_runs_unless_asked(export_adapter, export_base_dir, tmp_path):
    """A base model folder whose config names its own Python code (auto_map): without --trust-remote-code the
    export and verify refuse it in one sentence, never asking on the terminal, and the code never runs."""
    run, _ = export_adapter
    base = tmp_path / "base"
    shutil.copytree(export_base_dir, base)
    marker = tmp_path / "code-ran"
    (base / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((base / "config.json").read_text())
    config.update(model_type="gora-untrusted", auto_map={"AutoConfig": "evil.Config",
                                                         "AutoModelForCausalLM": "evil.Model"})
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(GoraError, match="could not load model"):
        export_merged(run, tmp_path / "merged", base=str(base))
    export_peft(run, tmp_path / "peft")
    with pytest.raises(GoraError, match="could not load model"):
        verify(tmp_path / "peft", base=str(base), prompts=[[3, 4]], max_new_tokens=2)
    assert not marker.exists() and not (tmp_path / "merged").exists()


def test_hostile_adapter_files_are_one_sentence(export_adapter, tmp_path, capsys, monkeypatch):
    """Damaged or crafted adapter and run files: each export ends in one escaped sentence and exit 2."""
    monkeypatch.delenv("GORA_DEBUG", raising=False)
    source, _ = export_adapter
    config = json.loads((source / "adapter" / "adapter_config.json").read_text())
    _, tensors, _ = read_adapter(source / "adapter")
    lora_b = next(k for k in tensors if k.endswith("lora_B.weight"))
    cases = {
        "config-list": ({"adapter_config.json": "[1, 2]"}, "holds a JSON list, not an object"),
        "config-twice": ({"adapter_config.json": '{"r": 4, "r": 64}'}, "JSON key 'r' appears twice"),
        "config-escapes": ({"adapter_config.json": json.dumps(dict(config, task_type="\x1b[2J\nError: none"))},
                           r"task_type '\\x1b\[2J\\nError: none' is not one gorafit exports"),
        "run-record-list": ({"run.json": "[]"}, "run record .* holds a JSON list"),
        "pattern-not-regex": ({"adapter_config.json": json.dumps(dict(config, rank_pattern={"(": 4}))},
                              "pattern key that is not a regular expression"),
        "pattern-list": ({"adapter_config.json": json.dumps(dict(config, rank_pattern=[4]))},
                         "holds a list where PEFT wants a pattern object"),
        "alpha-text": ({"adapter_config.json": json.dumps(dict(config, lora_alpha="8"))},
                       "lora_alpha '8': PEFT needs a number"),
        "weights-garbage": ({"adapter_model.safetensors": b"\x00" * 64}, "is not a readable safetensors file"),
        "weights-nan": ({"adapter_model.safetensors": dict(tensors, **{lora_b: tensors[lora_b] * float("nan")})},
                        "holds NaN or infinite values in .*lora_B"),
    }
    for name, (files, message) in cases.items():
        run = tmp_path / name
        shutil.copytree(source, run)
        for file, content in files.items():
            path = run / file if file == "run.json" else run / "adapter" / file
            if isinstance(content, dict):
                export_mod.save_file(content, str(path))
            else:
                path.write_bytes(content if isinstance(content, bytes) else content.encode())
        code, _, err = _run_cli(["export", str(run), "-o", str(tmp_path / f"{name}-out")], capsys)
        if name == "alpha-text":
            assert code == 0, err  # the native export keeps the config as PEFT wrote it; folding needs the number
            shutil.rmtree(tmp_path / f"{name}-out")
            code, _, err = _run_cli(["export", str(run), "--vllm-legacy", "-o", str(tmp_path / f"{name}-out")],
                                    capsys)
        assert code == 2 and err.startswith("Error: ") and re.search(message, err), (name, err)
        assert "Traceback" not in err and "\x1b" not in err and err.count("\n") == 1, (name, err)
        assert not (tmp_path / f"{name}-out").exists()


def test_exports_are_readable_as_the_umask_says(export_adapter, tmp_path, capsys, monkeypatch):
    """A serving account must be able to read an export: modes follow the umask (not mkdtemp's 0700)."""
    monkeypatch.delenv("GORA_DEBUG", raising=False)
    run, _ = export_adapter
    old = os.umask(0o022)
    try:
        export_peft(run, tmp_path / "out")
        export_merged(run, tmp_path / "merged")
    finally:
        os.umask(old)
    for folder in (tmp_path / "out", tmp_path / "merged"):
        assert folder.stat().st_mode & 0o777 == 0o755
        assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o644}
    (tmp_path / "out" / "gora_export.json").write_text("[]")  # a crafted record: verify says so in one sentence
    code, _, err = _run_cli(["verify", str(tmp_path / "out")], capsys)
    assert code == 2 and "export record" in err and "holds a JSON list" in err and "Traceback" not in err


def test_failed_export_leaves_nothing(export_adapter, tmp_path, monkeypatch):
    run, _ = export_adapter

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_mod, "save_file", broken)
    with pytest.raises(OSError):
        export_peft(run, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def _group() -> click.Group:
    @click.group()
    def gorafit():
        """Test group."""

    gorafit.add_command(export_cmd)
    gorafit.add_command(verify_cmd)
    return gorafit


def _run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(_group(), args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_cli_bad_input_exits_2(export_adapter, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GORA_DEBUG", raising=False)
    run, _ = export_adapter
    code, _, err = _run_cli(["export", str(run), "--format", "tflite", "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and "Invalid value for '--format'" in err
    (tmp_path / "exists").mkdir()
    code, _, err = _run_cli(["export", str(run), "-o", str(tmp_path / "exists")], capsys)
    assert code == 2 and err.startswith("Error: output") and "--overwrite" in err and "Traceback" not in err
    (tmp_path / "run2").mkdir()
    (tmp_path / "run2" / "run.json").write_text("{}")
    code, _, err = _run_cli(["export", str(tmp_path / "run2"), "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and "has no final adapter" in err
    code, _, err = _run_cli(["export", str(run), "--format", "merged", "--vllm-legacy", "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and "--vllm-legacy applies to --format peft only" in err


def test_cli_export_prints_serve_command(export_adapter, tmp_path):
    run, _ = export_adapter
    result = CliRunner().invoke(export_cmd, [str(run), "--format", "peft", "-o", str(tmp_path / "gora")])
    assert result.exit_code == 0, result.output
    assert "--enable-lora --max-lora-rank 16 --lora-target-modules down_proj q_proj v_proj --lora-modules gora=" \
        in result.output
    assert "python -m vllm.entrypoints.openai.api_server --model" in result.output
    result = CliRunner().invoke(export_cmd, [str(run), "-o", str(tmp_path / "gora")])
    assert result.exit_code != 0 and isinstance(result.exception, GoraError)


# ---------------------------------------------------------------------------------------------------
# verify


def test_verify_passes_and_catches_a_tampered_export(export_adapter, tmp_path, capsys):
    run, _ = export_adapter
    export_peft(run, tmp_path / "good", vllm_legacy=True)
    report = verify(tmp_path / "good", prompts=["the cat sat on the", "a big red car"], max_new_tokens=6)
    assert report.ok and report.tokens_equal and report.max_abs_logprob_diff < 1e-5, report.summary()
    assert report.adapter_effect > 1e-2  # the check can tell the adapter from the base model

    export_peft(run, tmp_path / "bad")
    config, tensors, metadata = read_adapter(tmp_path / "bad")
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key] = tensors[key] * 3
    export_mod.save_file(tensors, str(tmp_path / "bad" / "adapter_model.safetensors"), metadata=metadata)
    report = verify(tmp_path / "bad", prompts=["the cat sat on the"], max_new_tokens=4)
    assert not report.ok and report.max_abs_logprob_diff > 1e-3

    code, out, _ = _run_cli(["verify", str(tmp_path / "bad"), "--prompt", "the cat", "--max-new-tokens", "3"], capsys)
    assert code == 1 and "MISMATCH" in out and "Largest |logprob difference|" in out
    code, out, _ = _run_cli(["verify", str(tmp_path / "good"), "--prompt", "the cat", "--max-new-tokens", "3"], capsys)
    assert code == 0 and out.startswith("OK")


def test_greedy_tokens_match_a_plain_loop_and_never_stop_at_eos():
    """`greedy_tokens` (model.generate) decodes the raw logits: the same tokens and log-probs as a step-by-step
    argmax without a cache, exactly `new_tokens` of them even when EOS wins, whatever generation_config.json asks."""
    from transformers import GenerationConfig

    from gorafit.verify import _greedy_without_cache, greedy_tokens

    model = tiny_llama().eval()
    with torch.no_grad():
        model.lm_head.weight[model.config.eos_token_id] *= 8  # EOS often the argmax
    model.generation_config = GenerationConfig(eos_token_id=2, repetition_penalty=5.0, max_length=4)
    saved = model.generation_config.to_dict()
    for prompt in ([5, 6, 7], [9], [3, 30, 4, 11]):
        tokens, logprobs = greedy_tokens(model, prompt, 10)
        expected, expected_logprobs = _greedy_without_cache(_logits_fn_of(model), prompt, 10)
        assert tokens == expected and len(tokens) == 10
        assert max(abs(a - b) for a, b in zip(logprobs, expected_logprobs)) < 1e-5
    assert any(2 in greedy_tokens(model, p, 10)[0][:-1] for p in ([5, 6, 7], [9], [3, 30, 4, 11]))
    assert model.generation_config.to_dict() == saved  # the model's own defaults are put back


def _logits_fn_of(model):
    return lambda ids: _logits(model, ids)


def test_verify_bad_input(export_adapter, tmp_path, monkeypatch):
    run, _ = export_adapter
    export_peft(run, tmp_path / "out")
    with pytest.raises(GoraError, match="onnx engine runs onnx exports"):
        verify(tmp_path / "out", engine="onnx")
    with pytest.raises(GoraError, match="cannot run .*: give --python the interpreter"):
        verify(tmp_path / "out", engine="vllm", python=str(tmp_path), prompts=[[3, 4]], max_new_tokens=2)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(GoraError, match="the vllm engine needs vLLM.*--python"):
        verify(tmp_path / "out", engine="vllm", prompts=[[3, 4]])
    with pytest.raises(GoraError, match="--python .* does not exist"):
        verify(tmp_path / "out", engine="vllm", python=str(tmp_path / "no-python"), prompts=[[3, 4]])


# ---------------------------------------------------------------------------------------------------
# Slow: the real SmolLM2-135M (and vLLM when a serving environment exists)


def _vllm_python() -> str | None:
    candidate = os.environ.get("GORA_VLLM_PYTHON") or str(ROOT / ".venv-serve" / "bin" / "python")
    return candidate if Path(candidate).exists() else None


_VLLM_CHECK = """
import json, sys
from vllm.config.lora import LoRAConfig
from vllm.lora.peft_helper import PEFTHelper
limits = LoRAConfig(max_lora_rank=32)
verdicts = []
for config in json.load(open(sys.argv[1])):
    try:
        PEFTHelper.from_dict(config).validate_legal(limits)
        verdicts.append(True)
    except (ValueError, TypeError):
        verdicts.append(False)
print(json.dumps(verdicts))
"""


@pytest.mark.slow
@pytest.mark.skipif(_vllm_python() is None, reason="no serving environment with vLLM (.venv-serve or $GORA_VLLM_PYTHON); "
                    "scripts/serve_test.sh builds one")
def test_vllm_rules_agree_with_vllm(export_adapter, tmp_path):
    """check_vllm_compatible accepts exactly what vLLM's own PEFTHelper accepts (no engine needed)."""
    import subprocess

    run, _ = export_adapter
    configs = [dict(_good_config(), **change) for change, _ in _NEGATIVE_CASES]
    configs += [_good_config(), dict(_good_config(), modules_to_save=["score"]),
                dict(_good_config(), init_lora_weights="gaussian"), dict(_good_config(), rank_pattern={"q": 32})]
    for legacy in (False, True):
        export_peft(run, tmp_path / str(legacy), vllm_legacy=legacy)
        configs.append(json.loads((tmp_path / str(legacy) / "adapter_config.json").read_text()))
    (tmp_path / "configs.json").write_text(json.dumps(configs))
    proc = subprocess.run([_vllm_python(), "-c", _VLLM_CHECK, str(tmp_path / "configs.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    verdicts = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = [check_vllm_compatible(config, 32) == [] for config in configs]
    assert ours == verdicts
    assert verdicts.count(False) == len(_NEGATIVE_CASES)


@pytest.fixture(scope="module")
def export_smollm2_adapter(tmp_path_factory) -> tuple[str, Path, PeftModel]:
    from goraplan.models import resolve_model_path

    base_dir = resolve_model_path("smollm2-135m")
    folder = tmp_path_factory.mktemp("smollm2-adapter")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = _make_adapter(base, folder / "adapter", ["q_proj", "k_proj", "v_proj", "o_proj"], "CAUSAL_LM")
    with torch.no_grad():  # smaller B than the tiny models': keep SmolLM2's text sensible
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.1)
    model.save_pretrained(folder / "adapter")
    return base_dir, folder / "adapter", model


@pytest.mark.slow
def test_smollm2_peft_and_merged_exports(export_smollm2_adapter, tmp_path):
    base_dir, adapter, source = export_smollm2_adapter
    ids = torch.randint(100, 40000, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = _logits(source, ids)
    export_peft(adapter, tmp_path / "native")
    export_peft(adapter, tmp_path / "legacy", vllm_legacy=True)
    torch.testing.assert_close(_logits(_reload(base_dir, tmp_path / "native"), ids), expected, atol=1e-5, rtol=0)
    # Legacy stores s_i * B rounded to float32 (half an ulp per entry); through 30 layers and an adapter
    # that moves logits by several units, that is up to ~1e-4 on logits of size ~30.
    torch.testing.assert_close(_logits(_reload(base_dir, tmp_path / "legacy"), ids), expected, atol=1e-4, rtol=0)

    # In float64 end to end the fold is exact: B' = s_i * B stored in float64 gives the same logits.
    adapter64 = tmp_path / "adapter64"
    adapter64.mkdir()
    config, tensors, _ = read_adapter(adapter)
    (adapter64 / "adapter_config.json").write_text(json.dumps(config))
    export_mod.save_file({k: v.double() for k, v in tensors.items()}, str(adapter64 / "adapter_model.safetensors"))
    export_peft(adapter64, tmp_path / "legacy64", vllm_legacy=True)

    def load64(folder):
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64)
        return PeftModel.from_pretrained(model, folder, torch_dtype=torch.float64).eval()

    with torch.no_grad():
        exact = load64(adapter64)(input_ids=ids).logits
        folded = load64(tmp_path / "legacy64")(input_ids=ids).logits
    torch.testing.assert_close(folded, exact, atol=1e-9, rtol=0)

    export_merged(adapter, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(merged, ids), expected, atol=1e-4, rtol=0)
    report = verify(tmp_path / "legacy", max_new_tokens=8)
    assert report.ok, report.summary()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_ONNX, reason="onnx, onnxscript and onnxruntime are not installed (pip install 'goraplan[onnx]')")
def test_smollm2_onnx_export(export_smollm2_adapter, tmp_path):
    _, adapter, _ = export_smollm2_adapter
    export_onnx(adapter, tmp_path / "onnx")
    report = verify(tmp_path / "onnx", engine="onnx", max_new_tokens=8)
    assert report.ok, report.summary()


@pytest.mark.slow
@pytest.mark.skipif(_vllm_python() is None, reason="no serving environment with vLLM (.venv-serve or $GORA_VLLM_PYTHON); "
                    "scripts/serve_test.sh builds one")
def test_smollm2_vllm_native_and_legacy(export_smollm2_adapter, tmp_path):
    _, adapter, _ = export_smollm2_adapter
    for legacy in (False, True):
        export_peft(adapter, tmp_path / str(legacy), vllm_legacy=legacy)
        report = verify(tmp_path / str(legacy), engine="vllm", python=_vllm_python(), max_new_tokens=8)
        assert report.ok and report.max_abs_logprob_diff <= 1e-4, report.summary()
