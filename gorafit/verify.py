"""Check an export against the trained adapter: same greedy tokens, log-probs within a tolerance.

The reference is the trained PEFT model (base + the adapter the export came from, float32, in this
process). The candidate is the export run by one engine:

- ``peft``: a peft export reloaded with PEFT over the base; a merged export loaded with transformers.
- ``onnx``: an onnx export run by onnxruntime.
- ``vllm``: a peft export (or a merged one) run by vLLM's offline engine in another interpreter
  (`gorafit.vllm_serving.run_vllm_jobs`).

For a causal LM the candidate generates greedily (no stop at EOS); the reference scores the
candidate's tokens teacher-forced and generates its own greedy tokens. The report gives whether the
tokens are equal and the largest ``|log p_candidate - log p_reference|`` over the candidate's tokens.
For a classifier it compares the class log-probs and the predicted labels.

An export compressed at export (``gorafit export --max-rank R``) is checked against the trained adapter
compressed the same way (so the check stays exact), and the report also states what compression
changed: the same comparison against the uncompressed trained adapter.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from gorafit import run_folder
from gorafit.compress import compress_adapter
from gorafit.export import ONNX_FILE, read_export_record, require_onnx
from gorafit.saved_adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_task,
    load_adapted_model,
    module_ranks,
    plain_lora_config,
    read_adapter,
)
from gorafit.vllm_serving import (
    lora_target_modules,
    run_vllm_jobs,
    served_model,
    smallest_max_lora_rank,
    vllm_python,
)
from goraplan.errors import GoraError
from goraplan.untrusted import printable

__all__ = ["ENGINES", "DEFAULT_PROMPTS", "VerifyReport", "verify", "greedy_tokens", "score_tokens"]

ENGINES = ("peft", "vllm", "onnx")
DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colours are",
)

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # ids [1, T] -> logits [1, T, V] (or [1, C] for seq-cls)
Generations = tuple[list[list[int]], list[list[float]]]  # per prompt: greedy tokens, and their log-probs


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
    # for an export compressed to a lower rank: the candidate against the uncompressed trained adapter
    compression_change: dict[str, Any] | None = None

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
        return (f"{verdict}: {self.engine} on {self.export_format} export {printable(self.export_dir)} vs trained "
                f"adapter {printable(self.reference)}: {what} {agree}, max |logprob diff| "
                f"{self.max_abs_logprob_diff:.3g} (tolerance {self.tolerance:g}) over {size} (the adapter itself "
                f"changes log-probs by up to {self.adapter_effect:.3g}).{self._compression_sentence()}")

    def _compression_sentence(self) -> str:
        change = self.compression_change
        if change is None:
            return ""
        what = "greedy tokens" if self.task == "causal-lm" else "predicted labels"
        agree = "identical" if change["tokens_equal"] else f"differ (prompts {change['mismatched_prompts']})"
        return (f" Compressed to rank {change['max_rank']} at export, so the reference above is the trained adapter "
                f"compressed the same way; against the uncompressed adapter the export's {what} are {agree} and "
                f"its log-probs change by up to {change['max_abs_logprob_change']:.3g}.")


# ---------------------------------------------------------------------------------------------------
# What the export is, and what it is compared with


def _export_format(export_dir: Path, record: dict[str, Any]) -> str:
    """peft, merged or onnx: from the export's record, else from the files a bare folder holds."""
    if record.get("format"):
        return str(record["format"])
    if (export_dir / ADAPTER_CONFIG).is_file():
        return "peft"
    if (export_dir / ONNX_FILE).is_file():
        return "onnx"
    if (export_dir / "config.json").is_file():
        return "merged"
    raise GoraError(f"{printable(export_dir)} holds no adapter_config.json, model.onnx or config.json: "
                    f"it is not an export.")


def _reference_dir(reference: str | os.PathLike | None, record: dict[str, Any], export_dir: Path) -> Path:
    ref = reference or record.get("source_adapter")
    if not ref:
        raise GoraError(f"{printable(export_dir)} does not record the adapter it came from: pass --reference with "
                        f"the trained adapter (or run folder).")
    path = Path(ref).expanduser()
    if path.is_dir() and not (path / ADAPTER_CONFIG).is_file():
        path = run_folder.adapter_dir(path)
    if not (path / ADAPTER_CONFIG).is_file():
        raise GoraError(f"the trained adapter {printable(path)} is gone (no {ADAPTER_CONFIG}): pass --reference "
                        f"with its current folder.")
    return path


@dataclass(frozen=True)
class _Export:
    """The export being verified: its folder, format (peft, merged, onnx), base model and task."""

    dir: Path
    format: str
    base: str
    task: str
    compressed_to: int | None = None  # `gorafit export --max-rank R`: R


def _what_to_verify(export_dir: str | os.PathLike, base: str | None,
                    reference: str | os.PathLike | None) -> tuple[_Export, Path]:
    """The export (its format, base model and task, from its record when it has one) and the trained adapter."""
    export_dir = Path(export_dir).expanduser()
    if not export_dir.is_dir():
        raise GoraError(f"export {printable(export_dir)} is not a folder: give the -o folder of `gorafit export`.")
    record = read_export_record(export_dir)
    export_format = _export_format(export_dir, record)
    ref_dir = _reference_dir(reference, record, export_dir)
    ref_config, _, _ = read_adapter(ref_dir)
    base = base or record.get("base_model") or ref_config.get("base_model_name_or_path")
    if not base:
        raise GoraError("no base model is recorded for this export: pass --base.")
    compressed_to = (record.get("compression") or {}).get("max_rank")
    return _Export(export_dir, export_format, base, adapter_task(ref_config), compressed_to), ref_dir


def _check_engine(engine: str, export_format: str, task: str, export_dir: Path) -> None:
    if engine not in ENGINES:
        raise GoraError(f"unknown engine {printable(engine)}: use one of {', '.join(ENGINES)}.")
    if engine == "onnx" and export_format != "onnx":
        raise GoraError(f"the onnx engine runs onnx exports, and {printable(export_dir)} is a {export_format} "
                        f"export: use --engine peft or vllm.")
    if engine != "onnx" and export_format == "onnx":
        raise GoraError(f"{printable(export_dir)} is an onnx export: verify it with --engine onnx.")
    if engine == "vllm" and task != "causal-lm":
        raise GoraError("the vllm engine verifies causal-lm exports only: verify a classifier with --engine peft "
                        "or onnx.")


def _prompt_ids(prompts: Sequence[str] | Sequence[Sequence[int]] | None, tokenizer: Any) -> list[list[int]]:
    prompts = list(prompts) if prompts else list(DEFAULT_PROMPTS)
    if all(isinstance(p, str) for p in prompts):
        ids = [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    else:
        ids = [[int(t) for t in p] for p in prompts]
    if any(len(p) == 0 for p in ids):
        raise GoraError("an empty prompt cannot be verified: give prompts with at least one token.")
    return ids


# ---------------------------------------------------------------------------------------------------
# Decoding and scoring


def _logits_fn(model: torch.nn.Module) -> LogitsFn:
    def logits(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()

    return logits


@contextmanager
def _raw_greedy(model: torch.nn.Module) -> Iterator[None]:
    """Set the checkpoint's own generation defaults aside (EOS stop, repetition penalty, forced tokens):
    the candidates (vLLM with explicit sampling parameters, ONNX) decode the raw logits."""
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = inner.generation_config
    inner.generation_config = GenerationConfig(pad_token_id=getattr(inner.config, "pad_token_id", None))
    try:
        yield
    finally:
        inner.generation_config = saved


def greedy_tokens(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probs from ``model.generate`` (exactly `new_tokens`: never stops at EOS).

    >>> greedy_tokens(model, [1, 450, 7483], 4)  # doctest: +SKIP
    ([310, 3444, 338, 3681], [-1.52, -0.31, -0.02, -0.87])
    """
    ids = torch.tensor([prompt])
    with torch.no_grad(), _raw_greedy(model):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                             max_new_tokens=new_tokens, eos_token_id=None, output_logits=True,
                             return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [float(torch.log_softmax(step[0].double(), dim=-1)[token]) for step, token in zip(out.logits, tokens)]
    return tokens, logprobs


def _greedy_without_cache(logits_fn: LogitsFn, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy decoding for an engine that has neither ``generate`` nor a cache (ONNX): the whole sequence each step."""
    ids = list(prompt)
    tokens, logprobs = [], []
    for _ in range(new_tokens):
        row = torch.log_softmax(logits_fn(torch.tensor([ids]))[0, -1].double(), dim=-1)
        token = int(row.argmax())
        tokens.append(token)
        logprobs.append(float(row[token]))
        ids.append(token)
    return tokens, logprobs


def score_tokens(logits_fn: LogitsFn, prompt: list[int], tokens: list[int]) -> list[float]:
    """Teacher-forced log-probs of `tokens` after `prompt`, in one forward pass."""
    if not tokens:
        return []
    ids = torch.tensor([list(prompt) + list(tokens[:-1])])
    rows = torch.log_softmax(logits_fn(ids)[0, len(prompt) - 1:].double(), dim=-1)
    return [float(rows[i, t]) for i, t in enumerate(tokens)]


# ---------------------------------------------------------------------------------------------------
# The candidate: the export run by one engine


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


def _torch_candidate(export: _Export, trust_remote_code: bool) -> torch.nn.Module:
    """A peft export over its base, or a merged export, loaded with PEFT / transformers in float32."""
    from goraplan.models import load_model

    if export.format == "peft":
        model, _, _ = load_adapted_model(export.dir, export.base, torch.float32, trust_remote_code)
        return model
    labels = len(json.loads((export.dir / "config.json").read_text()).get("id2label") or {}) or None
    model, _ = load_model(str(export.dir.resolve()), export.task, dtype=torch.float32, device="cpu",
                          num_labels=labels if export.task == "seq-cls" else None, trust_remote_code=trust_remote_code)
    return model


def _vllm_generations(export: _Export, ids: list[list[int]], new_tokens: int, python: str,
                      seconds: dict[str, float]) -> Generations:
    """vLLM's greedy tokens and log-probs for `ids`: the base model with the peft export, or the merged export."""
    if export.format == "peft":
        config, tensors, _ = read_adapter(export.dir)
        model, adapter = served_model(export.base), str(export.dir.resolve())
        ranks = module_ranks(config, tensors)
        max_lora_rank, targets = smallest_max_lora_rank(max(ranks.values())), lora_target_modules(ranks)
    else:
        model, adapter, max_lora_rank, targets = str(export.dir.resolve()), None, None, None
    request = {  # served as the export's printed command serves it: smallest rank bucket, wrappers on its modules
        "model": model, "dtype": "float32", "max_model_len": max(256, max(map(len, ids)) + new_tokens + 8),
        "max_lora_rank": max_lora_rank, "lora_target_modules": targets,
        "jobs": [{"name": "verify", "adapter": adapter, "prompts": ids, "max_tokens": new_tokens, "logprobs": True}],
    }
    result = run_vllm_jobs(request, python)
    job = result["jobs"]["verify"]
    seconds.update(vllm_startup=result["startup_s"], vllm_generate=sum(job["seconds"]))
    return job["tokens"], job["logprobs"]


def _candidate(engine: str, export: _Export, ids: list[list[int]], new_tokens: int, python: str | None,
               trust_remote_code: bool, seconds: dict[str, float]) -> Generations | LogitsFn:
    """The export run by `engine`: its greedy generations (causal-lm), or its logits function (seq-cls)."""
    if engine == "vllm":
        return _vllm_generations(export, ids, new_tokens, python, seconds)
    if engine == "onnx":
        logits_fn = _onnx_logits_fn(export.dir)
        generate = partial(_greedy_without_cache, logits_fn)
    else:
        model = _torch_candidate(export, trust_remote_code)
        logits_fn, generate = _logits_fn(model), partial(greedy_tokens, model)
    if export.task == "seq-cls":
        return logits_fn
    runs = [generate(prompt, new_tokens) for prompt in ids]
    return [run[0] for run in runs], [run[1] for run in runs]


def _load_compressed_reference(model: torch.nn.Module, ref_dir: Path, max_rank: int) -> None:
    """Load the trained adapter compressed to `max_rank` (what the export holds) into `model` as adapter "compressed"."""
    config, tensors, metadata = read_adapter(ref_dir)
    config, tensors, _ = compress_adapter(dict(plain_lora_config(config), inference_mode=True), tensors, max_rank)
    with tempfile.TemporaryDirectory(prefix="gorafit-verify-") as tmp:
        (Path(tmp) / ADAPTER_CONFIG).write_text(json.dumps(config))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(tmp) / ADAPTER_WEIGHTS),
                  metadata=dict(metadata, format="pt"))
        model.load_adapter(tmp, adapter_name="compressed", is_trainable=False)
    model.eval()


# ---------------------------------------------------------------------------------------------------
# Comparing


def _compare_generations(reference: torch.nn.Module, ids: list[list[int]], candidate: Generations,
                         new_tokens: int) -> list[dict[str, Any]]:
    """Per prompt: the reference's own greedy tokens vs the candidate's, and the candidate's log-probs vs the
    reference's on the same tokens (and the base model's, to show what the adapter changes)."""
    ref_fn = _logits_fn(reference)
    details = []
    for i, prompt in enumerate(ids):
        tokens, logprobs = candidate[0][i], candidate[1][i]
        ref_tokens, _ = greedy_tokens(reference, prompt, new_tokens)
        scored = score_tokens(ref_fn, prompt, tokens)
        with reference.disable_adapter():
            base_scored = score_tokens(ref_fn, prompt, tokens)
        details.append({"prompt": i, "reference_tokens": ref_tokens, "tokens": tokens,
                        "tokens_equal": ref_tokens == tokens,
                        "max_abs_logprob_diff": max((abs(a - b) for a, b in zip(logprobs, scored)), default=0.0),
                        "adapter_effect": max((abs(a - b) for a, b in zip(scored, base_scored)), default=0.0)})
    return details


def _compare_labels(reference: torch.nn.Module, candidate: LogitsFn, ids: list[list[int]]) -> list[dict[str, Any]]:
    """Per input: the class log-probs and predicted labels of the reference and the candidate (and the base)."""
    ref_fn = _logits_fn(reference)

    def class_logprobs(fn: LogitsFn, prompt: list[int]) -> torch.Tensor:
        return torch.log_softmax(fn(torch.tensor([prompt]))[0].double().reshape(-1), -1)

    details = []
    for i, prompt in enumerate(ids):
        ref_lp, cand_lp = class_logprobs(ref_fn, prompt), class_logprobs(candidate, prompt)
        with reference.disable_adapter():
            base_lp = class_logprobs(ref_fn, prompt)
        details.append({"prompt": i, "reference_label": int(ref_lp.argmax()), "label": int(cand_lp.argmax()),
                        "tokens_equal": int(ref_lp.argmax()) == int(cand_lp.argmax()),
                        "max_abs_logprob_diff": float((ref_lp - cand_lp).abs().max()),
                        "adapter_effect": float((ref_lp - base_lp).abs().max())})
    return details


def verify(
    export_dir: str | os.PathLike,
    base: str | None = None,
    engine: str = "peft",
    reference: str | os.PathLike | None = None,
    prompts: Sequence[str] | Sequence[Sequence[int]] | None = None,
    max_new_tokens: int = 16,
    tolerance: float = 1e-4,
    python: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
) -> VerifyReport:
    """Compare an export run by `engine` with the trained PEFT model (base + `reference` adapter, float32).

    `reference` defaults to the adapter recorded in the export's ``gora_export.json``; `base` to the
    base model recorded there (or in the adapter config).

    >>> report = verify("out/gora-adapter", engine="vllm", python=".venv-serve/bin/python")  # doctest: +SKIP
    >>> report.ok, report.max_abs_logprob_diff  # doctest: +SKIP
    (True, 3.1e-06)
    """
    export, ref_dir = _what_to_verify(export_dir, base, reference)
    _check_engine(engine, export.format, export.task, export.dir)
    if engine == "vllm":
        python = vllm_python(python)  # before minutes of loading models

    started = time.perf_counter()
    ref_model, tokenizer, _ = load_adapted_model(ref_dir, export.base, torch.float32, trust_remote_code)
    seconds = {"load_reference": time.perf_counter() - started}
    ids = _prompt_ids(prompts, tokenizer)
    new_tokens = max_new_tokens if export.task == "causal-lm" else 0
    started = time.perf_counter()
    candidate = _candidate(engine, export, ids, new_tokens, python, trust_remote_code, seconds)
    seconds["candidate"] = time.perf_counter() - started
    started = time.perf_counter()

    def compare() -> list[dict[str, Any]]:
        if export.task == "seq-cls":
            return _compare_labels(ref_model, candidate, ids)
        return _compare_generations(ref_model, ids, candidate, new_tokens)

    change = None
    if export.compressed_to is not None:
        uncompressed = compare()
        change = {"max_rank": export.compressed_to, "tokens_equal": all(d["tokens_equal"] for d in uncompressed),
                  "mismatched_prompts": [d["prompt"] for d in uncompressed if not d["tokens_equal"]],
                  "max_abs_logprob_change": max(d["max_abs_logprob_diff"] for d in uncompressed),
                  "per_prompt": [d["max_abs_logprob_diff"] for d in uncompressed]}
        _load_compressed_reference(ref_model, ref_dir, export.compressed_to)
        ref_model.set_adapter("compressed")
    details = compare()
    seconds["reference"] = time.perf_counter() - started
    mismatched = [d["prompt"] for d in details if not d["tokens_equal"]]
    return VerifyReport(
        engine=engine, export_dir=str(export.dir), export_format=export.format, reference=str(ref_dir),
        base_model=export.base, task=export.task, prompts=len(ids), new_tokens=new_tokens, tolerance=tolerance,
        max_abs_logprob_diff=max(d["max_abs_logprob_diff"] for d in details), tokens_equal=not mismatched,
        adapter_effect=max(d["adapter_effect"] for d in details),
        mismatched_prompts=mismatched, seconds=seconds, details=details, compression_change=change,
    )
