"""Export a trained GoRA adapter: a PEFT adapter for vLLM (native or legacy), merged weights, or ONNX.

GoRA's trained artifact is an ordinary PEFT LoRA adapter (GORA.md, stage 3): per module i a rank
``r_i`` (``rank_pattern``), and the rsLoRA scaling ``s_i = alpha / sqrt(r_i)`` (``use_rslora``), so
``W_i + s_i * B_i @ A_i`` is the trained weight. Three ways out:

- ``peft``: the adapter as it is (vLLM 0.32+ and PEFT read ``rank_pattern``, ``alpha_pattern``
  and ``use_rslora``). With ``vllm_legacy=True`` each module's scaling is folded into its ``B``
  (``B' = s_i * B``) and the config says ``r = lora_alpha = r_max``, ``use_rslora = false`` and
  ``rank_pattern = alpha_pattern = {module: r_i}``: the scaling is then 1 for every module, both for a
  server that reads the patterns (``alpha_i / r_i = r_i / r_i``) and for one that ignores them
  (``lora_alpha / r = r_max / r_max``).
- ``merged``: base weights with the adapter merged in (``W + s B A``), a plain transformers folder.
- ``onnx``: the merged model traced with ``torch.onnx.export(dynamo=True)``: ``input_ids`` and
  ``attention_mask`` in, ``logits`` out, batch and sequence axes dynamic.

Every export is written to a temporary folder beside the target and renamed into place, and carries
``gora_export.json`` (what was exported from what, the plan's sha256) and a model card ``README.md``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from goraplan.errors import GoraError

__all__ = [
    "FORMATS",
    "VLLM_MAX_LORA_RANKS",
    "ExportResult",
    "AdapterSource",
    "resolve_adapter",
    "read_adapter",
    "module_ranks",
    "module_scalings",
    "fold_scalings",
    "smallest_max_lora_rank",
    "check_vllm_compatible",
    "vllm_serve_command",
    "export_peft",
    "export_merged",
    "export_onnx",
    "write_model_card",
    "load_base_model",
]

FORMATS = ("peft", "merged", "onnx")
# vLLM's `--max-lora-rank` accepts exactly these values (vllm/config/lora.py, MaxLoRARanks).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Full modules vLLM loads beside a LoRA: the classification head, under one of these names.
VLLM_MODULES_TO_SAVE = ("classifier", "score")
# String inits vLLM accepts: they only set the initial weights, the saved adapter is a plain LoRA.
VLLM_INIT_STRINGS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
# PEFT inits that change the base weights when the adapter is loaded: such an adapter is not a plain
# LoRA over the base model, and writing `true` in its place would silently change the model.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXPORT_RECORD = "gora_export.json"
ONNX_FILE = "model.onnx"
_PREFIX = "base_model.model."
# `<prefix><module>.lora_A.weight`, `<module>.lora_B.weight`, `<module>.lora_embedding_A`, ...
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                       r"(?:\.weight)?$")
_TASKS = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "seq-cls"}


# ---------------------------------------------------------------------------------------------------
# Reading an adapter


@dataclass
class AdapterSource:
    """Where an adapter lives: the adapter folder and, when it came from `gorafit run`, the run folder."""

    adapter_dir: Path
    run_dir: Path | None = None
    run_info: dict[str, Any] | None = None

    @property
    def plan_sha256(self) -> str | None:
        return (self.run_info or {}).get("plan_sha256")


def resolve_adapter(path: str | os.PathLike) -> AdapterSource:
    """A run folder (``RUN/adapter`` + ``RUN/run.json``) or an adapter folder, checked to hold an adapter.

    >>> resolve_adapter("runs/sarcasm").adapter_dir  # doctest: +SKIP
    PosixPath('runs/sarcasm/adapter')
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise GoraError(f"{path} does not exist: give a run folder written by `gorafit run` or a PEFT adapter folder.")
    if path.is_file():
        raise GoraError(f"{path} is a file: give a run folder written by `gorafit run` or a PEFT adapter folder.")
    if (path / ADAPTER_CONFIG).is_file():
        run_dir = path.parent if (path.parent / "run.json").is_file() and path.name == "adapter" else None
        return AdapterSource(path, run_dir, _read_run_info(run_dir) if run_dir else None)
    if (path / "run.json").is_file() or (path / "adapter").exists():
        adapter = path / "adapter"
        if not (adapter / ADAPTER_CONFIG).is_file():
            raise GoraError(f"run folder {path} has no final adapter ({adapter / ADAPTER_CONFIG} is missing): "
                            f"let `gorafit run` finish, or export a checkpoint's adapter folder instead.")
        return AdapterSource(adapter, path, _read_run_info(path))
    raise GoraError(f"{path} holds neither {ADAPTER_CONFIG} nor run.json: give a run folder written by "
                    f"`gorafit run` or a PEFT adapter folder.")


def _read_run_info(run_dir: Path) -> dict[str, Any] | None:
    file = run_dir / "run.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise GoraError(f"{file} is not valid JSON ({exc}): restore it or export {run_dir / 'adapter'} directly.") from exc


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """The adapter's config (a dict, as in ``adapter_config.json``), tensors and safetensors metadata.

    >>> config, tensors, metadata = read_adapter("runs/sarcasm/adapter")  # doctest: +SKIP
    """
    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / ADAPTER_CONFIG
    weights = adapter_dir / ADAPTER_WEIGHTS
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError as exc:
        raise GoraError(f"{config_file} is missing: give a PEFT adapter folder.") from exc
    except ValueError as exc:
        raise GoraError(f"{config_file} is not valid JSON ({exc}).") from exc
    if not weights.is_file():
        if (adapter_dir / "adapter_model.bin").is_file():
            raise GoraError(f"{adapter_dir} holds adapter_model.bin (pickle), which gorafit never loads: "
                            f"re-save the adapter with safe_serialization=True.")
        raise GoraError(f"{weights} is missing: give a PEFT adapter folder saved with safetensors.")
    if config.get("peft_type", "LORA") != "LORA":
        raise GoraError(f"{config_file} is a {config.get('peft_type')} adapter: gorafit exports LoRA adapters only.")
    with safe_open(str(weights), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no iter)
    return config, tensors, metadata


def _lora_modules(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, str]]:
    """``{module path: {"A": key, "B": key}}`` for every LoRA module in the adapter's tensors."""
    modules: dict[str, dict[str, str]] = {}
    for key in tensors:
        match = _LORA_KEY.match(key)
        if match:
            modules.setdefault(match["module"], {})[match["kind"][-1]] = key
    for module, keys in modules.items():
        if set(keys) != {"A", "B"}:
            raise GoraError(f"the adapter's tensors hold only lora_{''.join(keys)} for module {module}: "
                            f"the adapter file is incomplete.")
    return modules


def _pattern_value(pattern: dict[str, Any], module: str) -> Any:
    """PEFT's `get_pattern_key` rule (vLLM uses the same): a key matches a suffix at a "." boundary, first wins."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def module_ranks(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """``{module path: r_i}`` from the tensors' shapes, checked against what the config says.

    >>> module_ranks(config, tensors)  # doctest: +SKIP
    {'model.layers.0.self_attn.q_proj': 12, ...}
    """
    ranks = {}
    for module, keys in sorted(_lora_modules(tensors).items()):
        rank = int(tensors[keys["A"]].shape[0])
        said = _pattern_value(config.get("rank_pattern") or {}, module)
        said = config.get("r") if said is None else said
        if said != rank:
            raise GoraError(f"adapter_config.json gives module {module} rank {said} but its lora_A has {rank} rows: "
                            f"the config and the weights do not belong together.")
        ranks[module] = rank
    if not ranks:
        raise GoraError("the adapter holds no LoRA tensors (no *.lora_A.weight / *.lora_B.weight): nothing to export.")
    return ranks


def module_scalings(config: dict[str, Any], ranks: dict[str, int]) -> dict[str, float]:
    """The scaling PEFT (and vLLM) apply to each module: ``alpha_i / sqrt(r_i)`` (rsLoRA) or ``alpha_i / r_i``.

    >>> module_scalings({"lora_alpha": 16, "use_rslora": True}, {"q": 4})
    {'q': 8.0}
    """
    scalings = {}
    for module, rank in ranks.items():
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module)
        alpha = config["lora_alpha"] if alpha is None else alpha
        scalings[module] = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return scalings


def _pattern_key(module: str) -> str:
    """The rank/alpha pattern key of one module: its full path, escaped, so it matches that module only."""
    return re.escape(module)


def fold_scalings(
    config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The legacy form of an adapter: ``B' = s_i * B``, ``r = lora_alpha = r_max``, every scaling 1.

    Pure: returns a new config and new tensors (the inputs are not changed). Products are computed in
    float64 and stored in each tensor's own dtype.

    >>> legacy_config, legacy_tensors = fold_scalings(config, tensors)  # doctest: +SKIP
    >>> legacy_config["use_rslora"], legacy_config["r"] == legacy_config["lora_alpha"]  # doctest: +SKIP
    (False, True)
    """
    if config.get("use_dora"):
        raise GoraError("a DoRA adapter cannot be folded for older vLLM (its magnitude vector is not a scaling): "
                        "export it without --vllm-legacy.")
    ranks = module_ranks(config, tensors)
    scalings = module_scalings(config, ranks)
    modules = _lora_modules(tensors)
    folded = dict(tensors)
    for module, scaling in scalings.items():
        key = modules[module]["B"]
        folded[key] = (tensors[key].to(torch.float64) * scaling).to(tensors[key].dtype).contiguous()
    r_max = max(ranks.values())
    legacy = dict(config)
    legacy.update(
        r=r_max,
        lora_alpha=r_max,
        use_rslora=False,
        rank_pattern={_pattern_key(m): r for m, r in ranks.items()},
        alpha_pattern={_pattern_key(m): r for m, r in ranks.items()},
    )
    return legacy, folded


# ---------------------------------------------------------------------------------------------------
# vLLM acceptance


def smallest_max_lora_rank(r: int) -> int:
    """The smallest value of vLLM's ``--max-lora-rank`` that holds rank `r`.

    >>> smallest_max_lora_rank(12), smallest_max_lora_rank(32), smallest_max_lora_rank(300)
    (16, 32, 320)
    """
    for allowed in VLLM_MAX_LORA_RANKS:
        if r <= allowed:
            return allowed
    raise GoraError(f"rank {r} is above {VLLM_MAX_LORA_RANKS[-1]}, the largest --max-lora-rank vLLM accepts: "
                    f"plan with a smaller --max-rank.")


def check_vllm_compatible(config: dict[str, Any], max_lora_rank: int | None = None) -> list[str]:
    """Every reason vLLM (0.32) would refuse this ``adapter_config.json``; an empty list when it loads.

    Mirrors vLLM's ``PEFTHelper`` checks and runs without vLLM installed. With `max_lora_rank` given,
    also checks that it is a value vLLM accepts and that it holds the largest rank.

    >>> check_vllm_compatible({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]})
    []
    >>> check_vllm_compatible({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "use_dora": True})
    ['use_dora is true: vLLM does not support DoRA; train a plain LoRA adapter.']
    """
    problems: list[str] = []
    missing = [name for name in ("r", "lora_alpha", "target_modules") if name not in config]
    if missing:
        problems.append(f"adapter_config.json lacks {', '.join(missing)}, which vLLM requires.")
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}: vLLM serves LORA adapters only.")
    rank_pattern = config.get("rank_pattern") or {}
    ranks = [config.get("r")] + list(rank_pattern.values())
    for key, rank in [("r", config.get("r"))] + [(f"rank_pattern[{k!r}]", v) for k, v in rank_pattern.items()]:
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0):
            problems.append(f"{key} is {rank!r}: vLLM needs a positive integer rank.")
    modules_to_save = config.get("modules_to_save") or []
    unsupported = [m for m in modules_to_save if m not in VLLM_MODULES_TO_SAVE]
    if unsupported:
        problems.append(f"modules_to_save holds {unsupported}: vLLM loads only a classification head named "
                        f"{' or '.join(VLLM_MODULES_TO_SAVE)}.")
    if config.get("use_dora"):
        problems.append("use_dora is true: vLLM does not support DoRA; train a plain LoRA adapter.")
    if config.get("lora_bias"):
        problems.append("lora_bias is true: vLLM does not support LoRA bias.")
    if config.get("bias", "none") != "none":
        problems.append(f"bias is {config.get('bias')!r}: vLLM needs bias \"none\".")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in VLLM_INIT_STRINGS:
        problems.append(f"init_lora_weights is {init!r}: vLLM accepts true, false or one of "
                        f"{', '.join(VLLM_INIT_STRINGS)}; write true for a plain LoRA over the unchanged base.")
    for name, what in (("alora_invocation_tokens", "Activated LoRA (aLoRA)"), ("layer_replication", "layer_replication"),
                       ("use_bdlora", "block-diagonal LoRA (BD-LoRA)"), ("use_qalora", "QALoRA")):
        if config.get(name):
            problems.append(f"{name} is set: vLLM does not support {what}.")
    int_ranks = [r for r in ranks if isinstance(r, int) and not isinstance(r, bool)]
    if max_lora_rank is not None:
        if max_lora_rank not in VLLM_MAX_LORA_RANKS:
            problems.append(f"max_lora_rank {max_lora_rank} is not one vLLM accepts: use one of "
                            f"{', '.join(map(str, VLLM_MAX_LORA_RANKS))}.")
        if int_ranks and max(int_ranks) > max_lora_rank:
            problems.append(f"LoRA rank {max(int_ranks)} is greater than max_lora_rank {max_lora_rank}: serve with "
                            f"--max-lora-rank {smallest_max_lora_rank(max(int_ranks)) if max(int_ranks) <= 512 else '>512'}.")
    elif int_ranks and max(int_ranks) > VLLM_MAX_LORA_RANKS[-1]:
        problems.append(f"LoRA rank {max(int_ranks)} is above {VLLM_MAX_LORA_RANKS[-1]}, the largest max_lora_rank vLLM accepts.")
    return problems


def vllm_serve_command(base: str, adapter_dir: str | os.PathLike, max_rank: int, name: str | None = None) -> str:
    """The command that serves `adapter_dir` over `base` with vLLM's OpenAI-compatible server.

    >>> vllm_serve_command("HuggingFaceTB/SmolLM2-135M-Instruct", "out/gora", 12)
    'python -m vllm.entrypoints.openai.api_server --model HuggingFaceTB/SmolLM2-135M-Instruct --enable-lora --max-lora-rank 16 --lora-modules gora=out/gora'
    """
    adapter_dir = Path(adapter_dir)
    return (f"python -m vllm.entrypoints.openai.api_server --model {base} --enable-lora "
            f"--max-lora-rank {smallest_max_lora_rank(max_rank)} --lora-modules {name or adapter_dir.name}={adapter_dir}")


# ---------------------------------------------------------------------------------------------------
# Writing


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
    dtype: str | None = None
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values())

    @property
    def max_lora_rank(self) -> int:
        return smallest_max_lora_rank(self.max_rank)

    def serve_command(self, base: str | None = None) -> str | None:
        """For a peft export: the vLLM server command (with `base`, else the adapter's base model)."""
        if self.format != "peft":
            return None
        return vllm_serve_command(_served_model(base or self.base_model or "BASE_MODEL"), self.out, self.max_rank)


def _served_model(name: str) -> str:
    """vLLM does not know goraplan's built-in aliases: give it the alias's local folder."""
    try:
        from goraplan.models import MODEL_ALIASES, resolve_model_path

        return resolve_model_path(name) if name in MODEL_ALIASES else name
    except GoraError:
        return name


@contextmanager
def _staging(out: Path, overwrite: bool, sources: tuple[Path, ...]) -> Iterator[Path]:
    """A temporary folder beside `out`, renamed to `out` only when the block succeeds."""
    out = Path(out).expanduser()
    _check_target(out, overwrite, sources)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".gora.partial", dir=out.parent))
    old = None
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", suffix=".gora.partial", dir=out.parent))
            os.replace(out, old / "replaced")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _task(config: dict[str, Any]) -> str:
    task_type = config.get("task_type") or "CAUSAL_LM"
    if task_type not in _TASKS:
        raise GoraError(f"adapter task_type {task_type!r} is not one gorafit exports: use CAUSAL_LM or SEQ_CLS.")
    return _TASKS[task_type]


def _clean_init(config: dict[str, Any]) -> dict[str, Any]:
    """The trained adapter is a plain LoRA over the unchanged base: write ``init_lora_weights: true``."""
    init = config.get("init_lora_weights", True)
    if isinstance(init, str):
        if init.lower().startswith(_BASE_MODIFYING_INITS):
            raise GoraError(f"the adapter was initialised with {init!r}, which changes the base weights: convert it "
                            f"to a plain LoRA first (PEFT's path_initial_model_for_weight_conversion).")
        config = dict(config, init_lora_weights=True)
    return config


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    import importlib.metadata

    import peft
    import transformers

    try:
        tool = importlib.metadata.version("goraplan")
    except importlib.metadata.PackageNotFoundError:
        tool = "unknown (not installed)"
    return {"goraplan": tool, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def _write_record(tmp: Path, result: ExportResult, source: AdapterSource, extra: dict[str, Any] | None = None) -> None:
    record = {
        "format": result.format,
        "vllm_legacy": result.vllm_legacy,
        "dtype": result.dtype,
        "task": result.task,
        "base_model": result.base_model,
        "source_adapter": str(source.adapter_dir.resolve()),
        "source_run": str(source.run_dir.resolve()) if source.run_dir else None,
        "plan_sha256": source.plan_sha256,
        "source_adapter_sha256": _sha256(source.adapter_dir / ADAPTER_WEIGHTS),
        "ranks": result.ranks,
        "max_rank": result.max_rank,
        "max_lora_rank": result.max_lora_rank if result.max_rank <= VLLM_MAX_LORA_RANKS[-1] else None,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        **(extra or {}),
    }
    (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def export_peft(
    adapter_dir: str | os.PathLike, out: str | os.PathLike, vllm_legacy: bool = False, overwrite: bool = False
) -> ExportResult:
    """Write the adapter as a PEFT adapter folder that vLLM serves; `vllm_legacy` folds the scalings into B.

    >>> result = export_peft("runs/sarcasm", "out/gora-adapter")  # doctest: +SKIP
    >>> print(result.serve_command())  # doctest: +SKIP
    python -m vllm.entrypoints.openai.api_server --model ... --enable-lora --max-lora-rank 32 --lora-modules ...
    """
    started = time.perf_counter()
    source = resolve_adapter(adapter_dir)
    config, tensors, metadata = read_adapter(source.adapter_dir)
    task = _task(config)
    ranks = module_ranks(config, tensors)
    config = _clean_init(config)
    if vllm_legacy:
        config, tensors = fold_scalings(config, tensors)
    config["inference_mode"] = True
    out = Path(out).expanduser()
    result = ExportResult(out=out, format="peft", source=source.adapter_dir, base_model=config.get("base_model_name_or_path"),
                          task=task, ranks=ranks, vllm_legacy=vllm_legacy)
    metadata = dict(metadata, format="pt", **{"gora.export": "peft-legacy" if vllm_legacy else "peft"})
    if source.plan_sha256:
        metadata["gora.plan_sha256"] = str(source.plan_sha256)
    with _staging(out, overwrite, (source.adapter_dir,)) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS), metadata=metadata)
        result.problems = check_vllm_compatible(config, result.max_lora_rank if result.max_rank <= 512 else None)
        result.seconds = time.perf_counter() - started
        _write_record(tmp, result, source)
        write_model_card(tmp, result, source)
    return result


# ---------------------------------------------------------------------------------------------------
# Merged weights and ONNX


def _num_labels(config: dict[str, Any], tensors: dict[str, torch.Tensor], source: AdapterSource) -> int | None:
    """A classification adapter's number of labels: the saved head's output size."""
    for name in config.get("modules_to_save") or []:
        for key, tensor in tensors.items():
            if re.search(rf"(^|\.){re.escape(name)}(\.out_proj)?\.weight$", key):
                return int(tensor.shape[0])
    labels = ((source.run_info or {}).get("settings") or {}).get("labels")
    return len(labels) if isinstance(labels, list) else None


def _label_names(source: AdapterSource, num_labels: int | None) -> list[str] | None:
    info = source.run_info or {}
    for holder in (info, info.get("settings") or {}):
        labels = holder.get("labels") or holder.get("label_names")
        if isinstance(labels, list) and (num_labels is None or len(labels) == num_labels):
            return [str(label) for label in labels]
    return None


def load_base_model(
    base: str, task: str, dtype: str | torch.dtype = "float32", num_labels: int | None = None,
    label_names: list[str] | None = None,
) -> tuple[torch.nn.Module, Any]:
    """The base model in eval mode on CPU, and its tokenizer (None when the folder has none).

    Names resolve like everywhere else in goraplan (built-in aliases, local folders, Hub ids). The
    tokenizer is optional here: merging and verifying need the weights, not the text pipeline.
    """
    import transformers

    from goraplan.models import resolve_model_path

    path = resolve_model_path(base)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    kwargs: dict[str, Any] = {"dtype": dtype}
    if task == "seq-cls":
        if label_names:
            kwargs.update(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                          label2id={n: i for i, n in enumerate(label_names)})
        elif num_labels:
            kwargs["num_labels"] = num_labels
    auto = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModelForSequenceClassification
    try:
        model = auto.from_pretrained(path, **kwargs)
    except Exception as exc:
        raise GoraError(f"could not load base model {base!r} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): "
                        f"pass --base with a local model folder, a reachable Hub id or a built-in model.") from exc
    model.eval()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except Exception:
        tokenizer = None
    if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _base_name(config: dict[str, Any], base: str | None) -> str:
    name = base or config.get("base_model_name_or_path")
    if not name:
        raise GoraError("the adapter does not record its base model (base_model_name_or_path): pass --base.")
    return name


def load_adapted_model(
    adapter_dir: str | os.PathLike, base: str | None = None, dtype: str | torch.dtype = "float32",
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Base model + adapter as a PeftModel in eval mode (float32 by default), its tokenizer and the adapter config."""
    from peft import PeftModel

    source = resolve_adapter(adapter_dir)
    config, tensors, _ = read_adapter(source.adapter_dir)
    task = _task(config)
    num_labels = _num_labels(config, tensors, source) if task == "seq-cls" else None
    model, tokenizer = load_base_model(_base_name(config, base), task, dtype, num_labels,
                                       _label_names(source, num_labels))
    peft_model = PeftModel.from_pretrained(model, str(source.adapter_dir), is_trainable=False)
    peft_model.eval()
    return peft_model, tokenizer, config


def _merged(source: AdapterSource, base: str | None, dtype: str) -> tuple[torch.nn.Module, Any, dict, dict]:
    """Merge in float32 (whatever the target dtype), then cast."""
    if dtype not in ("float32", "bfloat16", "float16"):
        raise GoraError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16.")
    peft_model, tokenizer, config = load_adapted_model(source.adapter_dir, base, torch.float32)
    merged = peft_model.merge_and_unload()
    merged = merged.to(getattr(torch, dtype))
    merged.eval()
    _, tensors, _ = read_adapter(source.adapter_dir)
    return merged, tokenizer, config, module_ranks(config, tensors)


def export_merged(
    adapter_dir: str | os.PathLike, out: str | os.PathLike, base: str | None = None, dtype: str = "float32",
    overwrite: bool = False,
) -> ExportResult:
    """Write base + adapter merged (``W + s B A``) as a plain transformers model folder in `dtype`.

    >>> export_merged("runs/sarcasm", "out/merged", dtype="bfloat16")  # doctest: +SKIP
    """
    started = time.perf_counter()
    source = resolve_adapter(adapter_dir)
    out = Path(out).expanduser()
    _check_target(out, overwrite, (source.adapter_dir,))
    merged, tokenizer, config, ranks = _merged(source, base, dtype)
    result = ExportResult(out=out, format="merged", source=source.adapter_dir, base_model=_base_name(config, base),
                          task=_task(config), ranks=ranks, dtype=dtype)
    with _staging(out, overwrite, (source.adapter_dir,)) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        result.seconds = time.perf_counter() - started
        _write_record(tmp, result, source)
        write_model_card(tmp, result, source)
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
    missing = []
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            try:
                __import__(module)
            except ImportError:
                found = False
        if not found:
            missing.append(module)
    if missing:
        raise GoraError(f"ONNX export needs {', '.join(missing)}: pip install 'goraplan[onnx]'.")


def export_onnx(
    adapter_dir: str | os.PathLike, out: str | os.PathLike, base: str | None = None, dtype: str = "float32",
    overwrite: bool = False, sample_length: int = 8,
) -> ExportResult:
    """Write the merged model as ONNX (``model.onnx``: input_ids, attention_mask -> logits) plus its config.

    Traced with ``torch.onnx.export(dynamo=True)`` on a sample batch of 2, so batch and sequence
    axes stay dynamic. Check it with ``gorafit verify OUT --engine onnx``.

    >>> export_onnx("runs/sarcasm", "out/onnx")  # doctest: +SKIP
    """
    require_onnx()
    started = time.perf_counter()
    source = resolve_adapter(adapter_dir)
    out = Path(out).expanduser()
    _check_target(out, overwrite, (source.adapter_dir,))
    merged, tokenizer, config, ranks = _merged(source, base, dtype)
    result = ExportResult(out=out, format="onnx", source=source.adapter_dir, base_model=_base_name(config, base),
                          task=_task(config), ranks=ranks, dtype=dtype)
    wrapper = _LogitsOnly(merged).eval()
    vocab = int(getattr(merged.config, "vocab_size", 2) or 2)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (2, sample_length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with _staging(out, overwrite, (source.adapter_dir,)) as tmp:
        try:
            with torch.no_grad():
                program = torch.onnx.export(
                    wrapper, (input_ids, attention_mask), dynamo=True, verbose=False,
                    input_names=["input_ids", "attention_mask"], output_names=["logits"],
                    dynamic_shapes={"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}},
                )
        except Exception as exc:  # the exporter's failures are long; the first line says what
            raise GoraError(f"torch.onnx.export could not trace {type(merged).__name__} "
                            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}): "
                            f"export --format merged and convert that instead.") from exc
        large = sum(p.numel() * p.element_size() for p in merged.parameters()) > 1_800_000_000
        program.save(str(tmp / ONNX_FILE), external_data=large)
        merged.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        result.seconds = time.perf_counter() - started
        _write_record(tmp, result, source, {"onnx": {"file": ONNX_FILE, "inputs": ["input_ids", "attention_mask"],
                                                     "outputs": ["logits"], "external_data": large}})
        write_model_card(tmp, result, source)
    return result


def _check_target(out: Path, overwrite: bool, sources: tuple[Path, ...]) -> None:
    """Fail on a bad output folder before any work (loading a model can take minutes)."""
    for source in sources:
        if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
            raise GoraError(f"output {out} is (inside) the adapter being exported, {source}: choose another -o.")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise GoraError(f"output {out} already exists: pass --overwrite to replace it, or choose another -o.")
        if not out.is_dir():
            raise GoraError(f"output {out} is a file, not a folder: remove it or choose another -o.")


# ---------------------------------------------------------------------------------------------------
# Model card


def write_model_card(folder: str | os.PathLike, result: ExportResult, source: AdapterSource) -> Path:
    """Write ``README.md`` into `folder`: what this is, where it came from, how to load and serve it."""
    folder = Path(folder)
    ranks = result.ranks
    values = sorted(ranks.values())
    info = source.run_info or {}
    settings = info.get("settings") or {}
    base = result.base_model or "BASE_MODEL"
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: peft" if result.format == "peft" else "library_name: transformers",
        "tags: [lora, gora, rslora]",
        "---",
        "",
        f"# GoRA adapter export ({result.format}{', vLLM legacy' if result.vllm_legacy else ''})",
        "",
        "A LoRA adapter planned with GoRA (gradient-driven adaptive ranks, He et al. 2025, arXiv 2502.12171)",
        "and trained with gorafit: an ordinary PEFT LoRA over the unchanged base model.",
        "",
        f"- Base model: `{base}`",
        f"- Task: {result.task}",
        f"- Modules: {len(ranks)}; ranks min {values[0]}, median {values[len(values) // 2]}, max {values[-1]} "
        f"(sum {sum(values)})",
        f"- Plan sha256: `{source.plan_sha256 or 'unknown (exported from a bare adapter folder)'}`"
        + (f" (`{info['plan']}`)" if isinstance(info.get("plan"), str) else ""),
        f"- Exported from: `{source.adapter_dir}`",
    ]
    if result.dtype:
        lines.append(f"- dtype: {result.dtype}")
    lines += ["", "## Use it", ""]
    if result.format == "peft":
        if result.vllm_legacy:
            lines += ["Each module's scaling is folded into `lora_B`; `r = lora_alpha = r_max` and every module's",
                      "`rank_pattern` = `alpha_pattern` = its rank, so the scaling is 1 for servers that read",
                      "the patterns and for those that do not.", ""]
        else:
            lines += ["rsLoRA scaling `alpha / sqrt(r_i)` per module (`rank_pattern`, `use_rslora`); vLLM 0.32+ reads",
                      "both. For older servers export with `--vllm-legacy`.", ""]
        lines += ["vLLM:", "", "```", result.serve_command(base) or "", "```", "",
                  "PEFT:", "", "```python", "from peft import PeftModel",
                  f"model = PeftModel.from_pretrained(base_model, {str(result.out.name)!r})", "```"]
    elif result.format == "merged":
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification",
                  f"model = AutoModel{'ForCausalLM' if result.task == 'causal-lm' else 'ForSequenceClassification'}"
                  f".from_pretrained({result.out.name!r})", "```"]
    else:
        lines += ["`model.onnx`: inputs `input_ids`, `attention_mask` (int64, [batch, sequence]); output `logits`.", "",
                  "```python", "import onnxruntime", f"session = onnxruntime.InferenceSession('{result.out.name}/model.onnx')",
                  "logits = session.run(None, {'input_ids': ids, 'attention_mask': mask})[0]", "```"]
    lines += ["", "Check it against the trained adapter: `gorafit verify " + str(result.out.name) +
              f" --base {base}" + (" --engine vllm" if result.format == "peft" else
                                   " --engine onnx" if result.format == "onnx" else "") + "`.", ""]
    if settings:
        lines += ["## Training settings", "", "```json", json.dumps(settings, indent=2, sort_keys=True, default=str), "```", ""]
    lines += ["## Ranks", "", "| module | rank |", "|---|---|"]
    lines += [f"| `{module}` | {rank} |" for module, rank in ranks.items()]
    path = folder / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
