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
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import save_file

from goraplan.allocate import lora_budget
from goraplan.errors import GoraError, PlanFormatError
from goraplan.files import atomic_file, check_can_write, file_sha256
from goraplan.hub import resolve_plan_source
from goraplan.importance import normalise
from goraplan.init import lora_scaling
from goraplan.settings import PlanSettings, Task, validation_summary
from goraplan.step_size import StepSizeSearch
from goraplan.untrusted import printable, strict_json

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


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and verify a `.gora` plan: everything in it is checked, and everything derivable recomputed.

    The file is untrusted (plans travel between teams). It is read once; the safetensors header is parsed
    here, strictly (repeated JSON keys, non-finite numbers, a dtype other than float32, overlapping or
    uncovered byte ranges are refused), every tensor's sha256 is taken over its stored bytes, and every
    value the manifest derives (ranks within bounds, parameters, scaling, shares, totals) is recomputed.
    Any disagreement is a `PlanFormatError` naming the file.

    >>> plan = load_plan("plan.gora")  # doctest: +SKIP
    """
    path = resolve_plan_source(path)
    where = printable(path)
    if not path.is_file():
        raise GoraError(f"plan file {where} does not exist; build one with goraplan build")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise GoraError(f"cannot read plan file {where} ({exc.strerror or exc})") from None
    meta, raw_tensors = _read_safetensors(where, data)
    manifest = _read_manifest(where, meta)
    tensors = _check_tensors(where, manifest, raw_tensors)
    _check_derived(where, manifest)
    return Plan(manifest, tensors, sha256=hashlib.sha256(data).hexdigest())


# The safetensors format: an 8-byte little-endian header length, a JSON header, then the tensors' bytes.
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def _read_safetensors(where: str, data: bytes) -> tuple[dict[str, str], dict[str, tuple[tuple[int, ...], bytes]]]:
    """Header metadata, and name -> (shape, stored bytes) for every tensor; only float32 tensors are accepted."""
    def broken(why: str) -> PlanFormatError:
        return PlanFormatError(f"{where} is not a readable plan file (truncated or corrupted: {why})")

    if len(data) < 8:
        raise broken("shorter than a safetensors header")
    size = int.from_bytes(data[:8], "little")
    if size > min(_MAX_HEADER_BYTES, len(data) - 8):
        raise broken(f"header length {size} does not fit in the file's {len(data)} bytes")
    try:
        header = strict_json(data[8:8 + size], f"{where} (safetensors header)")
    except GoraError as exc:
        raise broken(str(exc)) from None
    if not isinstance(header, dict):
        raise broken("its header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise broken("its header metadata is not a map of strings")
    if meta.get("gora.format") != FORMAT:
        raise PlanFormatError(f"{where} is a safetensors file but not a GoRA plan (its header has no "
                              f"gora.format = {FORMAT})")
    body = memoryview(data)[8 + size:]
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise broken(f"tensor {printable(name)} has a malformed header entry")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if entry["dtype"] != "F32":
            raise PlanFormatError(f"{where}: tensor {printable(name)} is stored as {printable(entry['dtype'])}; "
                                  "a plan holds float32 tensors only")
        if not (isinstance(shape, list) and all(_is_count(n) for n in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(n) for n in offsets)):
            raise broken(f"tensor {printable(name)} has a malformed shape or byte range")
        if offsets[1] - offsets[0] != 4 * math.prod(shape):
            raise broken(f"tensor {printable(name)}'s byte range does not match its shape")
        spans.append((offsets[0], offsets[1], name, tuple(shape)))
    spans.sort()
    position = 0
    for begin, end, name, _ in spans:
        if begin != position:
            raise broken(f"tensor {printable(name)}'s bytes overlap another's or leave a gap")
        position = end
    if position != len(body):
        raise broken(f"its tensors cover {position} of the {len(body)} data bytes")
    return meta, {name: (shape, bytes(body[begin:end])) for begin, end, name, shape in spans}


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


def _read_manifest(where: str, meta: dict[str, str]) -> Manifest:
    header_version = meta.get("gora.schema_version", "")
    if not (header_version.isascii() and header_version.isdigit() and len(header_version) < 6):
        raise PlanFormatError(f"{where} has a corrupted schema version in its header "
                              f"({printable(repr(header_version))}, expected a whole number)")
    version = int(header_version)
    if version > SCHEMA_VERSION:
        raise PlanFormatError(
            f"{where} uses plan schema v{version}, newer than this goraplan reads (v{SCHEMA_VERSION}); "
            "upgrade goraplan to load it"
        )
    raw = meta.get("gora.manifest", "")
    if hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest() != meta.get("gora.manifest_sha256"):
        raise PlanFormatError(f"{where} is corrupted: its manifest does not match the manifest checksum")
    try:
        data = strict_json(raw, f"{where} (manifest)")
    except GoraError as exc:
        raise PlanFormatError(f"{where} has an invalid manifest: {exc}") from None
    if not isinstance(data, dict):
        raise PlanFormatError(f"{where} has an invalid manifest: a JSON {type(data).__name__}, not an object")
    if data.get("schema_version") != version or type(data.get("schema_version")) is not int:
        raise PlanFormatError(f"{where} has an invalid manifest: its schema_version "
                              f"{printable(repr(data.get('schema_version')))} disagrees with the header's v{version}")
    try:
        return Manifest.model_validate(migrate(data))
    except ValidationError as exc:
        raise PlanFormatError(f"{where} has an invalid manifest ({printable(validation_summary(exc))})") from None


def _check_tensors(
    where: str, manifest: Manifest, stored: dict[str, tuple[tuple[int, ...], bytes]]
) -> dict[str, torch.Tensor]:
    """The tensors, once each is exactly the one the manifest describes: name, shape, checksum, finite values."""
    expected = {}
    for m in manifest.modules:
        out_f, in_f = m.shape
        expected[f"{m.name}.lora_A"] = (m.rank, in_f)
        expected[f"{m.name}.lora_B"] = (out_f, m.rank)
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected or len(expected) != 2 * len(manifest.modules):
        raise PlanFormatError(
            f"{where} does not match its manifest: missing tensors {printable(missing[:3])}, unexpected tensors "
            f"{printable(unexpected[:3])}, {len(manifest.modules)} modules"
        )
    if set(manifest.checksums) != set(expected):
        raise PlanFormatError(f"{where} does not match its manifest: the checksums name other tensors than the plan")
    tensors = {}
    for name, shape in expected.items():
        stored_shape, raw = stored[name]
        if stored_shape != shape:
            raise PlanFormatError(f"{where}: tensor {printable(name)} has shape {stored_shape}, expected {shape}")
        if hashlib.sha256(raw).hexdigest() != manifest.checksums[name]:
            raise PlanFormatError(f"{where} is corrupted: tensor {printable(name)} does not match its checksum")
        tensor = torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape))
        if not bool(torch.isfinite(tensor).all()):
            raise PlanFormatError(f"{where}: tensor {printable(name)} holds NaN or infinite values; "
                                  "rebuild the plan")
        tensors[name] = tensor
    return tensors


def _check_derived(where: str, manifest: Manifest) -> None:
    """Every value the manifest derives from others, recomputed: a plan that disagrees with itself is refused."""
    def wrong(what: str) -> PlanFormatError:
        return PlanFormatError(f"{where} has an inconsistent manifest: {what}; rebuild the plan with goraplan build")

    modules = manifest.modules
    if not modules:
        raise wrong("it adapts no modules")
    names = [m.name for m in modules]
    if len(set(names)) != len(names):
        raise wrong("a module is listed twice")
    settings = manifest.settings
    r_min, r_max = settings.resolved_rank_bounds()
    for m in modules:
        out_f, in_f = m.shape
        name = printable(m.name)
        if out_f < 1 or in_f < 1:
            raise wrong(f"module {name} has shape {m.shape}")
        if m.rank > min(r_max, out_f, in_f):
            raise wrong(f"module {name} has rank {m.rank}, above max rank {r_max} or its {out_f}x{in_f} matrix")
        if m.params != m.rank * (out_f + in_f):
            raise wrong(f"module {name} records {m.params} parameters, its rank and shape give "
                        f"{m.rank * (out_f + in_f)}")
        if not math.isclose(m.scaling, lora_scaling(settings.alpha, m.rank), rel_tol=1e-9):
            raise wrong(f"module {name} records scaling {m.scaling!r}, alpha / sqrt(rank) is "
                        f"{lora_scaling(settings.alpha, m.rank)!r}")
        if m.importance < 0:
            raise wrong(f"module {name} has a negative importance")
    shares = normalise({m.name: m.importance for m in modules})
    if any(not math.isclose(m.share, shares[m.name], rel_tol=1e-9, abs_tol=1e-12) for m in modules):
        raise wrong("the modules' shares are not their normalised importance")
    costs = {m.name: m.shape[0] + m.shape[1] for m in modules}
    t = manifest.totals
    allocated = sum(m.params for m in modules)
    budget = lora_budget(costs, settings.rank)
    if (t.budget, t.lora_equivalent, t.allocated) != (budget, budget, allocated) or not math.isclose(
            t.ratio, allocated / budget, rel_tol=1e-9):
        raise wrong(f"its totals (budget {t.budget}, allocated {t.allocated}, ratio {t.ratio!r}) are not those of "
                    f"its modules (budget {budget}, allocated {allocated})")
    if settings.task != manifest.task:
        raise wrong(f"task {printable(manifest.task)} differs from the settings' {printable(settings.task)}")
    labels = manifest.labels
    if manifest.task == "seq-cls" and (labels is None or len(labels) < 2 or len(set(labels)) != len(labels)):
        raise wrong("a sequence-classification plan needs at least two distinct class labels")
    if manifest.task != "seq-cls" and labels is not None:
        raise wrong("only a sequence-classification plan has class labels")
    search = manifest.step_size_search
    if (settings.step_size == "auto") != (search is not None) or (search is not None and search.chosen <= 0):
        raise wrong("its step size search and its step_size setting disagree")
    if not 0 <= settings.seed < 2**32:
        raise wrong(f"seed {settings.seed} lies outside 0 .. 2**32 - 1")
    c = manifest.calibration
    if min(c.steps, c.examples, c.tokens) < 0:
        raise wrong("its calibration counts are negative")


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
