"""The model card (``README.md``) of an export: what it is, where it came from, how to load, serve and check it.

The YAML header is written by huggingface_hub's `ModelCardData`, so the Hub reads it as it reads any card.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import ModelCard, ModelCardData

if TYPE_CHECKING:
    from gorafit.export import ExportResult
    from gorafit.saved_adapter import AdapterSource

__all__ = ["write_model_card"]

_PIPELINE = {"causal-lm": "text-generation", "seq-cls": "text-classification"}


def write_model_card(folder: str | os.PathLike, result: ExportResult, source: AdapterSource) -> Path:
    """Write ``README.md`` into `folder` and return its path.

    >>> write_model_card("out/gora-adapter", result, source)  # doctest: +SKIP
    PosixPath('out/gora-adapter/README.md')
    """
    data = ModelCardData(base_model=result.base_model, library_name="peft" if result.format == "peft" else "transformers",
                         pipeline_tag=_PIPELINE.get(result.task), tags=["lora", "gora", "rslora"])
    sections = [_summary(result, source), _usage(result), _serving(result), _settings(source), _ranks(result)]
    body = "\n\n".join("\n".join(lines) for lines in sections if lines)
    path = Path(folder) / "README.md"
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n").save(path)
    return path


def _summary(result: ExportResult, source: AdapterSource) -> list[str]:
    values = sorted(result.ranks.values())
    plan = source.plan_sha256 or "unknown (exported from a bare adapter folder)"
    plan_file = ((source.run_record or {}).get("plan") or {}).get("path")
    lines = [
        f"# GoRA adapter export ({result.format}{', vLLM legacy' if result.vllm_legacy else ''})",
        "",
        "A LoRA adapter planned with GoRA (gradient-driven adaptive ranks, He et al. 2025, arXiv 2502.12171)",
        "and trained with gorafit: an ordinary PEFT LoRA over the unchanged base model.",
        "",
        f"- Base model: `{_base(result)}`",
        f"- Task: {result.task}",
        f"- Modules: {len(values)}; ranks min {values[0]}, median {values[len(values) // 2]}, max {values[-1]} "
        f"(sum {sum(values)})",
        f"- Plan sha256: `{plan}`" + (f" (`{plan_file}`)" if plan_file else ""),
        f"- Exported from: `{source.adapter_dir}`",
    ]
    if result.dtype:
        lines.append(f"- dtype: {result.dtype}")
    return lines


def _base(result: ExportResult) -> str:
    return result.base_model or "BASE_MODEL"


def _usage(result: ExportResult) -> list[str]:
    """How to load it (and, for a peft export, serve it), then how to check it against the trained adapter."""
    name = result.out.name
    if result.format == "peft":
        lines = _peft_usage(result)
    elif result.format == "merged":
        auto = "AutoModelForCausalLM" if result.task == "causal-lm" else "AutoModelForSequenceClassification"
        lines = ["```python", f"from transformers import {auto}", f"model = {auto}.from_pretrained({name!r})", "```"]
    else:
        lines = ["`model.onnx`: inputs `input_ids`, `attention_mask` (int64, [batch, sequence]); output `logits`.", "",
                 "```python", "import onnxruntime", f"session = onnxruntime.InferenceSession('{name}/model.onnx')",
                 "logits = session.run(None, {'input_ids': ids, 'attention_mask': mask})[0]", "```"]
    engine = {"peft": " --engine vllm", "onnx": " --engine onnx"}.get(result.format, "")
    check = f"Check it against the trained adapter: `gorafit verify {name} --base {_base(result)}{engine}`."
    return ["## Use it", "", *lines, "", check]


def _peft_usage(result: ExportResult) -> list[str]:
    if result.vllm_legacy:
        lines = ["Each module's scaling is folded into `lora_B`; `r = lora_alpha = r_max` and every module's",
                 "`rank_pattern` = `alpha_pattern` = its rank, so the scaling is 1 for servers that read",
                 "the patterns and for those that do not."]
    else:
        lines = ["rsLoRA scaling `alpha / sqrt(r_i)` per module (`rank_pattern`, `use_rslora`); vLLM 0.32+ reads",
                 "both. For older servers export with `--vllm-legacy`."]
    serve = result.serve_command(result.base_model)
    if serve:
        lines += ["", "vLLM:", "", "```", serve, "```"]
    return lines + ["", "PEFT:", "", "```python", "from peft import PeftModel",
                    f"model = PeftModel.from_pretrained(base_model, {result.out.name!r})", "```"]


def _serving(result: ExportResult) -> list[str]:
    """What serving it costs (vLLM pads to the bucket), how the command keeps that least, and any compression."""
    if result.format != "peft":
        return []
    from gorafit.vllm_serving import lora_target_modules

    lines = ["## Serving cost", ""]
    if result.max_lora_rank is not None:
        lines += [f"vLLM pads every module of every adapter to `--max-lora-rank`, so what this adapter costs to serve "
                  f"is set by its largest rank ({result.max_rank}), not by its parameter count: it is served at "
                  f"`--max-lora-rank {result.max_lora_rank}`, the smallest value vLLM accepts that holds it. "
                  f"`--lora-target-modules {' '.join(lora_target_modules(result.ranks))}` limits vLLM's LoRA wrappers "
                  f"to the adapter's own modules (by default vLLM also wraps modules the adapter never touches). A "
                  f"server holding several adapters needs the largest rank of all of them and every module any of "
                  f"them adapts: vLLM skips an adapter's weights on a module outside `--lora-target-modules` without "
                  f"a warning. The cost of each rank bucket, measured, is in gorafit's README (serving benchmark)."]
    c = result.compression
    if c is not None:
        worst = c.worst
        lines += ["", f"Compressed at export (`--max-rank {c.max_rank}`): {len(c.compressed)} of {len(c.modules)} "
                  f"modules were above rank {c.max_rank} and were replaced by the best rank-{c.max_rank} approximation "
                  f"of their update (truncated SVD), keeping {100 * c.kept:.3f}% of the whole adapter's update norm "
                  f"(what was dropped is {100 * c.relative_error:.2f}% of it)"
                  + (f"; lowest {100 * worst.kept:.3f}%, `{worst.module}`, rank {worst.rank}." if worst else ".")
                  + " `gorafit verify` states the log-prob change against the uncompressed adapter; "
                  "`gora_export.json` holds the per-module figures."]
    return lines


def _settings(source: AdapterSource) -> list[str]:
    settings = (source.run_record or {}).get("settings")
    if not settings:
        return []
    return ["## Training settings", "", "```json", json.dumps(settings, indent=2, sort_keys=True, default=str), "```"]


def _ranks(result: ExportResult) -> list[str]:
    return ["## Ranks", "", "| module | rank |", "|---|---|",
            *(f"| `{module}` | {rank} |" for module, rank in result.ranks.items())]
