"""Shared fixtures: tiny models built from configs, a tiny word-level tokenizer, tiny local data files."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from tests.tiny import make_tokenizer, sentences, tiny_llama


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama with a word-level tokenizer: loadable by path like any HF model folder."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_text_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    path = d / "text.jsonl"
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences(64)))
    return path


@pytest.fixture()
def cli_env(monkeypatch, tmp_path):
    """A clean cache and no Hub access for CLI tests."""
    monkeypatch.setenv("GORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("GORA_DEBUG", raising=False)
    return os.environ
