"""Export a trained GoRA adapter: a PEFT adapter for vLLM (native or legacy), merged weights, or ONNX.

Three ways out (docs/method.md §7):

- ``peft``: the adapter as it is (vLLM 0.32+ and PEFT read ``rank_pattern``, ``alpha_pattern`` and
  ``use_rslora``); with ``vllm_legacy=True`` each module's scaling is folded into its ``B``
  (`gorafit.saved_adapter.fold_scalings`) for servers that ignore the patterns. With ``max_rank=R``
  every module above rank R is first replaced by the best rank-R approximation of its update
  (`gorafit.compress`), which lowers what vLLM pads the adapter to; the record and the model card say
  how much of each update's norm was kept.
- ``merged``: base weights with the adapter merged in (``W + s B A``), a plain transformers folder.
- ``onnx``: the merged model traced with ``torch.onnx.export(dynamo=True)``: ``input_ids`` and
  ``attention_mask`` in, ``logits`` out, batch and sequence axes dynamic.

Every export is staged beside the target and renamed into place (`goraplan.files.staged_dir`), never
over one of its inputs, and carries ``gora_export.json`` (what was exported from what; it points to
the source adapter and run rather than copying them) and a model card ``README.md``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from gorafit.compress import CompressionReport, compress_adapter
from gorafit.saved_adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterSource,
    adapter_task,
    base_model_name,
    fold_scalings,
    load_adapted_model,
    module_ranks,
    plain_lora_config,
    read_adapter,
    resolve_adapter,
)
from gorafit.vllm_serving import (
    VLLM_MAX_LORA_RANKS,
    check_vllm_compatible,
    lora_target_modules,
    served_model,
    smallest_max_lora_rank,
    vllm_serve_command,
)
from goraplan.errors import GoraError
from goraplan.files import check_not_input, current_umask, file_sha256, staged_dir
from goraplan.untrusted import printable, read_json_object

__all__ = [
    "FORMATS",
    "DTYPES",
    "EXPORT_RECORD",
    "ONNX_FILE",
    "ExportResult",
    "export_peft",
    "export_merged",
    "export_onnx",
    "read_export_record",
    "require_onnx",
]

FORMATS = ("peft", "merged", "onnx")
DTYPES = ("float32", "bfloat16", "float16")
EXPORT_RECORD = "gora_export.json"
ONNX_FILE = "model.onnx"
# Above this many bytes of weights an ONNX file must keep them outside the protobuf (2 GiB limit).
_ONNX_INLINE_LIMIT = 1_800_000_000


@dataclass
class ExportResult:
    """What an export wrote, and how to use it."""

    out: Path
    format: str
    source: Path
    base_model: str | None
    task: str
    ranks: dict[str, int]
    vllm_legacy: bool = False
    base_revision: str | None = None  # the commit of base_model the adapter records (PEFT's `revision`)
    dtype: str | None = None
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    compression: CompressionReport | None = None  # set when `max_rank` lowered the adapter's ranks

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values())

    @property
    def max_lora_rank(self) -> int | None:
        """The smallest ``--max-lora-rank`` that serves this adapter; None when the rank is above vLLM's largest."""
        return smallest_max_lora_rank(self.max_rank) if self.max_rank <= VLLM_MAX_LORA_RANKS[-1] else None

    def serve_command(self, base: str | None = None) -> str | None:
        """For a peft export that vLLM can serve: the server command (over `base`, else the adapter's base)."""
        if self.format != "peft" or self.max_lora_rank is None:
            return None
        name = base or self.base_model or "BASE_MODEL"
        served = served_model(name)
        # the recorded commit belongs to the adapter's own Hub base, not to another base or a local folder
        revision = self.base_revision if name == self.base_model and served == name else None
        return vllm_serve_command(served, self.out, self.max_rank, target_modules=lora_target_modules(self.ranks),
                                  revision=revision)


# ---------------------------------------------------------------------------------------------------
# peft


def export_peft(
    adapter_dir: str | os.PathLike, out: str | os.PathLike, vllm_legacy: bool = False, overwrite: bool = False,
    max_rank: int | None = None,
) -> ExportResult:
    """Write the adapter as a PEFT adapter folder that vLLM serves; `vllm_legacy` folds the scalings into B;
    `max_rank` lowers every module above it to it by truncated SVD (`result.compression` reports what was kept).

    >>> result = export_peft("runs/sarcasm", "out/gora-adapter")  # doctest: +SKIP
    >>> print(result.serve_command())  # doctest: +SKIP
    python -m vllm.entrypoints.openai.api_server --model ... --enable-lora --max-lora-rank 32 --lora-modules ...
    """
    started = time.perf_counter()
    source = resolve_adapter(adapter_dir)
    config, tensors, metadata = read_adapter(source.adapter_dir)
    result = ExportResult(out=Path(out).expanduser(), format="peft", source=source.adapter_dir,
                          base_model=config.get("base_model_name_or_path"), task=adapter_task(config),
                          ranks=module_ranks(config, tensors), vllm_legacy=vllm_legacy,
                          base_revision=config["revision"] if isinstance(config.get("revision"), str) else None)
    config = dict(plain_lora_config(config), inference_mode=True)
    if max_rank is not None:
        config, tensors, result.compression = compress_adapter(config, tensors, max_rank)
        result.ranks = module_ranks(config, tensors)
    if vllm_legacy:
        config, tensors = fold_scalings(config, tensors)
    metadata = dict(metadata, format="pt", **{"gora.export": "peft-legacy" if vllm_legacy else "peft"})
    if result.compression is not None:
        metadata["gora.compressed_to_rank"] = str(max_rank)
    if source.plan_sha256:
        metadata["gora.plan_sha256"] = str(source.plan_sha256)
    with _staging(result.out, overwrite, source) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS), metadata=metadata)
        result.problems = check_vllm_compatible(config, result.max_lora_rank)
        _finish(tmp, result, source, started,
                extra={"compression": result.compression.to_dict()} if result.compression is not None else None)
    return result


# ---------------------------------------------------------------------------------------------------
# merged and ONNX


def _merged(source: AdapterSource, base: str, dtype: str, trust_remote_code: bool) -> tuple[torch.nn.Module, Any]:
    """Base + adapter merged in float32 (whatever the target dtype), then cast to `dtype`; and the tokenizer."""
    peft_model, tokenizer, _ = load_adapted_model(source.adapter_dir, base, torch.float32, trust_remote_code)
    merged = peft_model.merge_and_unload().to(getattr(torch, dtype))
    merged.eval()
    return merged, tokenizer


def _merged_result(source: AdapterSource, out: str | os.PathLike, format_: str, base: str | None,
                   dtype: str) -> ExportResult:
    """The result of a merged or ONNX export, filled from the adapter before any model is loaded."""
    if dtype not in DTYPES:
        raise GoraError(f"unknown dtype {printable(dtype)}: use {', '.join(DTYPES)}.")
    config, tensors, _ = read_adapter(source.adapter_dir)
    return ExportResult(out=Path(out).expanduser(), format=format_, source=source.adapter_dir,
                        base_model=base_model_name(config, base), task=adapter_task(config),
                        ranks=module_ranks(config, tensors), dtype=dtype)


def export_merged(
    adapter_dir: str | os.PathLike, out: str | os.PathLike, base: str | None = None, dtype: str = "float32",
    overwrite: bool = False, trust_remote_code: bool = False,
) -> ExportResult:
    """Write base + adapter merged (``W + s B A``) as a plain transformers model folder in `dtype`.

    >>> export_merged("runs/sarcasm", "out/merged", dtype="bfloat16")  # doctest: +SKIP
    """
    started = time.perf_counter()
    source = resolve_adapter(adapter_dir)
    result = _merged_result(source, out, "merged", base, dtype)
    with _staging(result.out, overwrite, source, result.base_model) as tmp:
        merged, tokenizer = _merged(source, result.base_model, dtype, trust_remote_code)
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _finish(tmp, result, source, started)
    return result


class _LogitsOnly(torch.nn.Module):
    """``(input_ids, attention_mask) -> logits``, no cache: the graph ONNX gets."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs = {"use_cache": False} if not getattr(self.model.config, "is_encoder_decoder", False) else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits


def require_onnx() -> None:
    """Raise GoraError naming the extra when onnx, onnxscript or onnxruntime is missing."""
    missing = [module for module in ("onnx", "onnxscript", "onnxruntime") if not _importable(module)]
    if missing:
        raise GoraError(f"ONNX export needs {', '.join(missing)}: pip install 'goraplan[onnx]'.")


def _importable(module: str) -> bool:
    try:
        if importlib.util.find_spec(module) is None:
            return False
        __import__(module)
    except (ImportError, ValueError):
        return False
    return True


def _trace_onnx(model: torch.nn.Module, file: Path, sample_length: int) -> bool:
    """Trace `model` to `file` on a sample batch of 2 with dynamic batch and sequence axes; True when the
    weights went to an external data file."""
    from goraplan.errors import first_line

    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    input_ids = torch.randint(0, vocab, (2, sample_length), generator=torch.Generator().manual_seed(0))
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                _LogitsOnly(model).eval(), (input_ids, torch.ones_like(input_ids)), dynamo=True, verbose=False,
                input_names=["input_ids", "attention_mask"], output_names=["logits"],
                dynamic_shapes={"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}},
            )
    except Exception as exc:  # the exporter's failures are long; the first line says what
        raise GoraError(f"torch.onnx.export could not trace {type(model).__name__} ({type(exc).__name__}: "
                        f"{first_line(exc)}): export --format merged and convert that instead.") from exc
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > _ONNX_INLINE_LIMIT
    program.save(str(file), external_data=large)
    return large


def export_onnx(
    adapter_dir: str | os.PathLike, out: str | os.PathLike, base: str | None = None, dtype: str = "float32",
    overwrite: bool = False, sample_length: int = 8, trust_remote_code: bool = False,
) -> ExportResult:
    """Write the merged model as ONNX (``model.onnx``: input_ids, attention_mask -> logits) plus its config.

    Check it with ``gorafit verify OUT --engine onnx``.

    >>> export_onnx("runs/sarcasm", "out/onnx")  # doctest: +SKIP
    """
    require_onnx()
    started = time.perf_counter()
    source = resolve_adapter(adapter_dir)
    result = _merged_result(source, out, "onnx", base, dtype)
    with _staging(result.out, overwrite, source, result.base_model) as tmp:
        merged, tokenizer = _merged(source, result.base_model, dtype, trust_remote_code)
        large = _trace_onnx(merged, tmp / ONNX_FILE, sample_length)
        merged.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _finish(tmp, result, source, started, {"onnx": {"file": ONNX_FILE, "inputs": ["input_ids", "attention_mask"],
                                                        "outputs": ["logits"], "external_data": large}})
    return result


# ---------------------------------------------------------------------------------------------------
# Staging and the record


@contextmanager
def _staging(out: Path, overwrite: bool, source: AdapterSource, base: str | None = None) -> Iterator[Path]:
    """A temporary folder beside `out`, renamed to `out` only when the block succeeds.

    Refused before any work (loading a model can take minutes): an `out` that is, holds or lies inside
    one of the export's inputs, and an existing `out` that is not a previous export (``--overwrite``
    replaces only what gorafit export wrote).
    """
    roles = {"the adapter being exported": source.adapter_dir, "the run it was trained in": source.run_dir,
             "the base model": _local_folder(base)}
    for role, path in roles.items():
        try:
            check_not_input(out, [path])
        except GoraError:
            raise GoraError(f"output {printable(out)} is (or holds, or lies inside) {role}, {printable(path)}: "
                            f"choose another -o.") from None
    if overwrite:
        _check_replaceable(out)
    with staged_dir(out, overwrite=overwrite, inputs=roles.values()) as tmp:
        yield tmp


def _local_folder(base: str | None) -> Path | None:
    """The folder a base model name resolves to, when it is a local one (the merged exports read it)."""
    if base is None:
        return None
    from goraplan.models import resolve_model_path

    try:
        path = Path(resolve_model_path(base))
    except GoraError:
        return None
    return path if path.is_dir() else None


def _check_replaceable(out: Path) -> None:
    """Refuse to replace a folder holding anything a previous `gorafit export` did not write there."""
    if out.is_symlink():
        raise GoraError(f"output {printable(out)} is a symbolic link: --overwrite replaces only a folder that "
                        f"gorafit export wrote; remove the link or choose another -o.")
    if not out.is_dir() or not any(out.iterdir()):
        return
    foreign = sorted(entry.name for entry in out.iterdir() if entry.name not in _written_by_export(out))
    if foreign:
        raise GoraError(f"output {printable(out)} holds {printable(foreign[0])}, which gorafit export did not write: "
                        f"--overwrite replaces only a previous export; move it away or choose another -o.")


def _written_by_export(folder: Path) -> set[str]:
    """The names a previous export's record lists (none when the folder holds no readable record)."""
    try:
        files = read_export_record(folder).get("files")
    except GoraError:
        return set()
    return {name for name in files if isinstance(name, str)} if isinstance(files, list) else set()


def read_export_record(export_dir: Path) -> dict[str, Any]:
    """The export's ``gora_export.json`` (an empty dict for a folder without one)."""
    file = Path(export_dir) / EXPORT_RECORD
    return read_json_object(file, "export record") if file.is_file() else {}


def _finish(tmp: Path, result: ExportResult, source: AdapterSource, started: float,
            extra: dict[str, Any] | None = None) -> None:
    """Write the model card and the record (last: it lists every file of the export)."""
    from gorafit.model_card import write_model_card

    result.seconds = time.perf_counter() - started
    write_model_card(tmp, result, source)
    record = _record(result, source, extra)
    record["files"] = sorted([p.name for p in tmp.iterdir()] + [EXPORT_RECORD])
    (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    _readable_as_umask_says(tmp)


def _readable_as_umask_says(folder: Path) -> None:
    """safetensors writes its files 0600 whatever the umask; a serving account must read an export like any file."""
    mode = 0o666 & ~current_umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def _record(result: ExportResult, source: AdapterSource, extra: dict[str, Any] | None) -> dict[str, Any]:
    """What was exported from what: the source adapter and run by path and hash, not copies of their records."""
    import datetime

    from goraplan.provenance import library_versions

    return {
        "format": result.format,
        "vllm_legacy": result.vllm_legacy,
        "dtype": result.dtype,
        "task": result.task,
        "base_model": result.base_model,
        "source_adapter": str(source.adapter_dir.resolve()),
        "source_adapter_sha256": file_sha256(source.adapter_dir / ADAPTER_WEIGHTS),
        "source_run": str(source.run_dir.resolve()) if source.run_dir else None,
        "plan_sha256": source.plan_sha256,
        "max_lora_rank": result.max_lora_rank,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        **(extra or {}),
    }
