"""The artifact: a `.gora` plan, one safetensors file with a versioned JSON manifest in its header.

Header ``__metadata__`` (str -> str, as safetensors wants):
``gora.format = "gora-plan"``, ``gora.schema_version``, ``gora.manifest`` (JSON) and
``gora.manifest_sha256``. Tensors: ``<module path>.lora_A`` ``[r_i, in]`` and ``<module path>.lora_B``
``[out, r_i]``, float32. Every tensor's sha256 is in the manifest and checked on load, so a flipped
byte anywhere is an error, never a silent change. No pickle: loading a plan cannot run code.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from goraplan.errors import GoraError, PlanFormatError
from goraplan.files import atomic_file, check_can_write, file_sha256
from goraplan.hub import resolve_plan_source
from goraplan.settings import PlanSettings, Task, validation_summary
from goraplan.step_size import StepSizeSearch

FORMAT = "gora-plan"
SCHEMA_VERSION = 1
TOOL_VERSION = "0.1.0"


# ---------------------------------------------------------------------------- manifest (schema v1)
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseModelInfo(_Strict):
    """The model a plan was built on; gorafit checks the fingerprint before training."""

    name_or_path: str = Field(description="Hub id, local folder or built-in alias.")
    revision: str | None = Field(None, description="Hub revision, where known.")
    architecture: str = Field(description="transformers class name, e.g. LlamaForCausalLM.")
    dtype: str = Field(description="dtype the model was loaded in for planning.")
    fingerprint: str = Field(description="sha256 over names, shapes and float32 bytes of the target weights.")


class CalibrationInfo(_Strict):
    """The data the gradients came from."""

    source: str | None = Field(None, description="Data set name, alias or path (None: batches given in Python).")
    split: str | None = None
    steps: int = Field(description="Gradient steps N actually accumulated.")
    examples: int
    tokens: int = Field(description="Non-padding tokens seen.")
    token_fingerprint: str = Field(description="sha256 over the input ids of every batch used.")
    mean_loss: float = Field(description="Mean loss of the base model over the calibration batches.")
    processes: int = Field(1, ge=1, description="Processes the gradients were computed on (torchrun's world size).")
    sharded: bool = Field(
        False, description="Whether the model was sharded with FSDP while planning (no process held a whole gradient)."
    )


class ModulePlan(_Strict):
    """One adapted linear layer."""

    name: str = Field(description="Full module path in the base model.")
    shape: tuple[int, int] = Field(description="Weight shape [out, in].")
    rank: int = Field(ge=1)
    importance: float = Field(description="Raw importance score I_i.")
    share: float = Field(description="Normalised importance a_i (eq. 9).")
    params: int = Field(description="Adapter parameters: rank * (out + in).")
    scaling: float = Field(description="alpha / sqrt(rank) (rsLoRA).")
    weight_sha256: str = Field(description="sha256 of the base weight's float32 bytes.")
    weight_sha256_rounded: dict[str, str] = Field(
        default_factory=dict,
        description="sha256 of the base weight rounded to each coarser dtype (bfloat16, float16), as float32 "
        "bytes: a lower-precision load of the same checkpoint matches it (absent in older plans).",
    )


class RanksSource(_Strict):
    """The plan whose ranks this one reuses (``goraplan build --ranks-from``): its allocation, this run's data."""

    source: str = Field(description="That plan as given: a path or a Hub repository OWNER/NAME[@REVISION].")
    plan_sha256: str = Field(description="sha256 of that plan file.")
    calibration_source: str | None = Field(None, description="The data that plan's ranks were allocated from.")
    token_fingerprint: str = Field(description="That plan's calibration token fingerprint.")


class Totals(_Strict):
    budget: int = Field(description="Parameter budget r0 * sum(out + in).")
    allocated: int = Field(description="Parameters the planned adapter trains.")
    lora_equivalent: int = Field(description="Parameters plain LoRA at r0 trains (= budget).")
    ratio: float = Field(description="allocated / lora_equivalent.")


class Manifest(_Strict):
    """Everything needed to understand, check and reproduce a plan."""

    schema_version: Literal[1] = SCHEMA_VERSION
    format: Literal["gora-plan"] = FORMAT
    tool_version: str = TOOL_VERSION
    created_at: str = Field(description="UTC time, ISO 8601.")
    base_model: BaseModelInfo
    task: Task
    labels: list[str] | None = Field(None, description="Class names for seq-cls.")
    target_modules: list[str] | Literal["all-linear"]
    settings: PlanSettings
    calibration: CalibrationInfo
    step_size_search: StepSizeSearch | None = Field(
        None, description="What --step-size auto measured and chose; absent for a fixed step size."
    )
    ranks_from: RanksSource | None = Field(
        None, description="Set when the ranks (and target modules) were taken from another plan instead of allocated."
    )
    modules: list[ModulePlan]
    totals: Totals
    checksums: dict[str, str] = Field(description="sha256 of each tensor's float32 bytes.")


    @property
    def step_size(self) -> float:
        """The gamma the initial adapter was built with (the chosen one under --step-size auto)."""
        return self.step_size_search.chosen if self.step_size_search else self.settings.step_size


def manifest_json_schema() -> dict:
    """The JSON Schema of the current manifest version (committed as ``schemas/gora-plan.v1.schema.json``)."""
    schema = Manifest.model_json_schema()
    schema["$id"] = f"https://goraplan.dev/schemas/gora-plan.v{SCHEMA_VERSION}.schema.json"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


# Older manifest versions are upgraded one step at a time: MIGRATIONS[k] turns a v(k) dict into v(k+1).
MIGRATIONS: dict[int, Callable[[dict], dict]] = {}


def migrate(manifest: dict) -> dict:
    version = int(manifest.get("schema_version", 0))
    while version < SCHEMA_VERSION:
        if version not in MIGRATIONS:
            raise PlanFormatError(f"plan schema v{version} is too old to read; rebuild the plan with goraplan build")
        manifest = MIGRATIONS[version](manifest)
        version = int(manifest["schema_version"])
    return manifest


# ---------------------------------------------------------------------------- the plan object
def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


class Plan:
    """A GoRA plan: the manifest plus the initial ``lora_A`` / ``lora_B`` of every module.

    >>> plan = load_plan("plan.gora")            # doctest: +SKIP
    >>> plan.rank_pattern["model\\\\.layers\\\\.0\\\\.self_attn\\\\.q_proj"]  # doctest: +SKIP
    12
    """

    def __init__(self, manifest: Manifest, tensors: dict[str, torch.Tensor], sha256: str | None = None):
        self.manifest = manifest
        self.tensors = tensors
        self.sha256 = sha256  # of the file it was loaded from or saved to
        self.stats: dict = {}  # timings and memory of the build; not part of the artifact

    # -- views that speak PEFT's language
    @property
    def ranks(self) -> dict[str, int]:
        """Full module path -> rank."""
        return {m.name: m.rank for m in self.manifest.modules}

    @property
    def rank_pattern(self) -> dict[str, int]:
        """PEFT ``LoraConfig.rank_pattern``: escaped full module path -> rank."""
        return {re.escape(m.name): m.rank for m in self.manifest.modules}

    def lora_a(self, module: str) -> torch.Tensor:
        return self.tensors[f"{module}.lora_A"]

    def lora_b(self, module: str) -> torch.Tensor:
        return self.tensors[f"{module}.lora_B"]

    # -- I/O
    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan atomically (temporary name, then rename) and return its path."""
        path = check_can_write(path, overwrite=True)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.tensors.items()}
        manifest_json = self.manifest.model_dump_json()
        metadata = {
            "gora.format": FORMAT,
            "gora.schema_version": str(SCHEMA_VERSION),
            "gora.manifest": manifest_json,
            "gora.manifest_sha256": hashlib.sha256(manifest_json.encode()).hexdigest(),
        }
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        self.sha256 = file_sha256(path)
        return path


def check_output_path(path: Path) -> None:
    """One sentence if a plan cannot be written at ``path``; see `goraplan.files.check_can_write`."""
    check_can_write(path, overwrite=True)


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and verify a `.gora` plan: format, schema version, manifest and every tensor checksum.

    `path` may also be a Hub model repository, ``OWNER/NAME[@REVISION]``: its ``plan.gora``, through
    huggingface_hub's cache (see `goraplan.hub.resolve_plan_source`).

    >>> plan = load_plan("plan.gora")  # doctest: +SKIP
    >>> plan = load_plan("team-a/sarcasm-plan@v1")  # doctest: +SKIP
    """
    path = resolve_plan_source(path)
    if not path.is_file():
        raise GoraError(f"plan file {path} does not exist; build one with goraplan build")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = list(f.keys())
            if meta.get("gora.format") != FORMAT:
                raise PlanFormatError(
                    f"{path} is a safetensors file but not a GoRA plan (its header has no gora.format = {FORMAT})"
                )
            tensors = {name: f.get_tensor(name) for name in names}
    except PlanFormatError:
        raise
    except Exception as exc:  # safetensors raises its own error types for broken headers and sizes
        raise PlanFormatError(f"{path} is not a readable plan file (truncated or corrupted: {exc})") from None
    manifest = _read_manifest(path, meta)
    _check_tensors(path, manifest, tensors)
    return Plan(manifest, tensors, sha256=file_sha256(path))


def _read_manifest(path: Path, meta: dict[str, str]) -> Manifest:
    try:
        version = int(meta.get("gora.schema_version", "0"))
    except ValueError:
        raise PlanFormatError(f"{path} has a corrupted schema version in its header") from None
    if version > SCHEMA_VERSION:
        raise PlanFormatError(
            f"{path} uses plan schema v{version}, newer than this goraplan reads (v{SCHEMA_VERSION}); "
            "upgrade goraplan to load it"
        )
    raw = meta.get("gora.manifest", "")
    if hashlib.sha256(raw.encode()).hexdigest() != meta.get("gora.manifest_sha256"):
        raise PlanFormatError(f"{path} is corrupted: its manifest does not match the manifest checksum")
    try:
        data = migrate(json.loads(raw))
        return Manifest.model_validate(data)
    except (json.JSONDecodeError, ValidationError) as exc:
        detail = validation_summary(exc) if isinstance(exc, ValidationError) else str(exc)
        raise PlanFormatError(f"{path} has an invalid manifest ({detail})") from None


def _check_tensors(path: Path, manifest: Manifest, tensors: dict[str, torch.Tensor]) -> None:
    expected = {}
    for m in manifest.modules:
        out_f, in_f = m.shape
        expected[f"{m.name}.lora_A"] = (m.rank, in_f)
        expected[f"{m.name}.lora_B"] = (out_f, m.rank)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise PlanFormatError(
            f"{path} does not match its manifest: missing tensors {missing[:3]}, unexpected tensors {unexpected[:3]}"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise PlanFormatError(f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
        if tensor_sha256(tensors[name]) != manifest.checksums.get(name):
            raise PlanFormatError(f"{path} is corrupted: tensor {name} does not match its checksum")


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
