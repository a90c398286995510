"""A saved PEFT LoRA adapter: finding it, reading it, its per-module ranks and scalings, and folding.

GoRA's trained artifact is an ordinary PEFT LoRA adapter (docs/method.md §7): per module i a rank
``r_i`` (``rank_pattern``) and the rsLoRA scaling ``s_i = alpha_i / sqrt(r_i)`` (``use_rslora``), so
``W_i + s_i * B_i @ A_i`` is the trained weight. Everything here reads the folder's two files
(``adapter_config.json`` and ``adapter_model.safetensors``) without importing PEFT's model classes;
`load_adapted_model` is the one place that builds the PEFT model over its base.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from gorafit import run_folder
from goraplan.errors import GoraError, first_line
from goraplan.untrusted import printable, read_json_object

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterSource",
    "resolve_adapter",
    "read_adapter",
    "adapter_task",
    "lora_modules",
    "pattern_value",
    "module_pattern_key",
    "module_ranks",
    "module_alpha",
    "module_scalings",
    "fold_scalings",
    "plain_lora_config",
    "base_model_name",
    "load_adapted_model",
]

# PEFT's file names (peft.utils.constants CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME), spelled out so that
# reading an adapter does not import PEFT, which takes seconds.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# `<prefix><module>.lora_A.weight`, `<module>.lora_B.weight`, `<module>.lora_embedding_A`, ...
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                       r"(?:\.weight)?$")
_TASKS = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "seq-cls"}
# PEFT inits that change the base weights when the adapter is loaded: such an adapter is not a plain
# LoRA over the base model, and writing `true` in its place would silently change the model.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass
class AdapterSource:
    """Where an adapter lives: the adapter folder and, when it came from `gorafit run`, the run folder."""

    adapter_dir: Path
    run_dir: Path | None = None
    run_record: dict[str, Any] | None = None

    @property
    def plan_sha256(self) -> str | None:
        return run_folder.plan_sha256(self.run_record) if self.run_record else None

    @property
    def label_names(self) -> list[str] | None:
        return run_folder.label_names(self.run_record) if self.run_record else None


def resolve_adapter(path: str | os.PathLike) -> AdapterSource:
    """A run folder (its final adapter and run record) or an adapter folder, checked to hold an adapter.

    >>> resolve_adapter("runs/sarcasm").adapter_dir  # doctest: +SKIP
    PosixPath('runs/sarcasm/adapter')
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise GoraError(f"{path} does not exist: give a run folder written by `gorafit run` or a PEFT adapter folder.")
    if path.is_file():
        raise GoraError(f"{path} is a file: give a run folder written by `gorafit run` or a PEFT adapter folder.")
    if (path / ADAPTER_CONFIG).is_file():
        run_dir = run_folder.run_of_adapter(path)
        return AdapterSource(path, run_dir, run_folder.read_record(run_dir) if run_dir else None)
    if run_folder.looks_like_run(path):
        adapter = run_folder.adapter_dir(path)
        if not (adapter / ADAPTER_CONFIG).is_file():
            raise GoraError(f"run folder {path} has no final adapter ({adapter / ADAPTER_CONFIG} is missing): "
                            f"let `gorafit run` finish, or export a checkpoint's adapter folder instead.")
        return AdapterSource(adapter, path, run_folder.read_record(path))
    raise GoraError(f"{path} holds neither {ADAPTER_CONFIG} nor {run_folder.RUN_FILE}: give a run folder written by "
                    f"`gorafit run` or a PEFT adapter folder.")


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """The adapter's config (a dict, as in ``adapter_config.json``), tensors and safetensors metadata.

    >>> config, tensors, metadata = read_adapter("runs/sarcasm/adapter")  # doctest: +SKIP
    """
    adapter_dir = Path(adapter_dir)
    config = _read_config(adapter_dir / ADAPTER_CONFIG)
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (adapter_dir / "adapter_model.bin").is_file():
            raise GoraError(f"{adapter_dir} holds adapter_model.bin (pickle), which gorafit never loads: "
                            f"re-save the adapter with safe_serialization=True.")
        raise GoraError(f"{weights} is missing: give a PEFT adapter folder saved with safetensors.")
    metadata, tensors = _read_weights(weights)
    return config, tensors, metadata


def _read_weights(weights: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The safetensors file's metadata and tensors, every one of them finite."""
    try:
        with safe_open(str(weights), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no iter)
    except Exception as exc:  # safetensors raises its own error types for a damaged header or data
        raise GoraError(f"{printable(weights)} is not a readable safetensors file ({printable(first_line(exc))}): "
                        f"restore the adapter from where it was trained.") from None
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise GoraError(f"{printable(weights)} holds NaN or infinite values in {printable(key)}: the adapter is "
                            f"broken (did its training diverge?); export a checkpoint from before.")
    return metadata, tensors


def _read_config(config_file: Path) -> dict[str, Any]:
    if not config_file.is_file():
        raise GoraError(f"{printable(config_file)} is missing: give a PEFT adapter folder.")
    config = read_json_object(config_file, "adapter config")
    if config.get("peft_type", "LORA") != "LORA":
        raise GoraError(f"{printable(config_file)} is a {printable(config.get('peft_type'))} adapter: "
                        f"gorafit exports LoRA adapters only.")
    return config


def adapter_task(config: dict[str, Any]) -> str:
    """goraplan's task name (``causal-lm`` / ``seq-cls``) for the adapter's PEFT ``task_type``.

    >>> adapter_task({"task_type": "SEQ_CLS"})
    'seq-cls'
    """
    task_type = config.get("task_type") or "CAUSAL_LM"
    if task_type not in _TASKS:
        raise GoraError(f"adapter task_type {printable(repr(task_type))} is not one gorafit exports: use CAUSAL_LM or SEQ_CLS.")
    return _TASKS[task_type]


def lora_modules(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, str]]:
    """``{module path: {"A": key, "B": key}}`` for every LoRA module in the adapter's tensors."""
    modules: dict[str, dict[str, str]] = {}
    for key in tensors:
        match = _LORA_KEY.match(key)
        if match:
            modules.setdefault(match["module"], {})[match["kind"][-1]] = key
    for module, keys in modules.items():
        if set(keys) != {"A", "B"}:
            raise GoraError(f"the adapter's tensors hold only lora_{''.join(keys)} for module {printable(module)}: "
                            f"the adapter file is incomplete.")
    return modules


def pattern_value(pattern: dict[str, Any], module: str) -> Any:
    """The value a PEFT ``rank_pattern`` / ``alpha_pattern`` gives `module`, None when no key matches it."""
    from peft.utils.other import get_pattern_key  # PEFT's own rule, which vLLM follows too

    if not pattern:
        return None
    if not isinstance(pattern, dict):
        raise GoraError(f"adapter_config.json holds a {type(pattern).__name__} where PEFT wants a pattern object "
                        f"({{module pattern: value}}): the config is damaged.")
    try:
        return pattern.get(get_pattern_key(pattern.keys(), module))
    except (re.error, TypeError) as exc:
        raise GoraError(f"adapter_config.json holds a pattern key that is not a regular expression ({printable(exc)}): "
                        f"the config is damaged.") from None


def module_pattern_key(module: str) -> str:
    """The ``rank_pattern`` / ``alpha_pattern`` key that matches `module` and no other: its escaped full path.

    >>> print(module_pattern_key("model.layers.0.q_proj"))
    model\\.layers\\.0\\.q_proj
    """
    return re.escape(module)


def module_ranks(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """``{module path: r_i}`` from the tensors' shapes, checked against what the config says.

    >>> module_ranks(config, tensors)  # doctest: +SKIP
    {'model.layers.0.self_attn.q_proj': 12, ...}
    """
    ranks = {}
    for module, keys in sorted(lora_modules(tensors).items()):
        rank = int(tensors[keys["A"]].shape[0])
        said = pattern_value(config.get("rank_pattern") or {}, module)
        said = config.get("r") if said is None else said
        if said != rank:
            raise GoraError(f"adapter_config.json gives module {printable(module)} rank {printable(said)} but its lora_A has {rank} rows: "
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
    root = math.sqrt if config.get("use_rslora") else float
    return {module: module_alpha(config, module) / root(rank) for module, rank in ranks.items()}


def module_alpha(config: dict[str, Any], module: str) -> float:
    """``alpha_i``: the module's ``alpha_pattern`` entry, else ``lora_alpha``.

    >>> module_alpha({"lora_alpha": 8, "alpha_pattern": {"q": 32}}, "layers.0.q")
    32
    """
    alpha = pattern_value(config.get("alpha_pattern") or {}, module)
    alpha = config.get("lora_alpha") if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise GoraError(f"adapter_config.json gives module {printable(module)} lora_alpha {printable(repr(alpha))}: "
                        f"PEFT needs a number.")
    return alpha


def fold_scalings(
    config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The legacy form of an adapter: ``B' = s_i * B``, ``r = lora_alpha = r_max``, every scaling 1.

    Each module's ``rank_pattern`` and ``alpha_pattern`` entry is its own rank (keyed by its escaped
    full path), so the scaling is 1 both for a server that reads the patterns (``r_i / r_i``) and for
    one that ignores them (``r_max / r_max``). Pure: returns a new config and new tensors. Products
    are computed in float64 and stored in each tensor's own dtype.

    >>> legacy_config, legacy_tensors = fold_scalings(config, tensors)  # doctest: +SKIP
    >>> legacy_config["use_rslora"], legacy_config["r"] == legacy_config["lora_alpha"]  # doctest: +SKIP
    (False, True)
    """
    if config.get("use_dora"):
        raise GoraError("a DoRA adapter cannot be folded for older vLLM (its magnitude vector is not a scaling): "
                        "export it without --vllm-legacy.")
    ranks = module_ranks(config, tensors)
    modules = lora_modules(tensors)
    folded = dict(tensors)
    for module, scaling in module_scalings(config, ranks).items():
        key = modules[module]["B"]
        folded[key] = (tensors[key].to(torch.float64) * scaling).to(tensors[key].dtype).contiguous()
    r_max = max(ranks.values())
    own_rank = {module_pattern_key(module): rank for module, rank in ranks.items()}
    legacy = dict(config, r=r_max, lora_alpha=r_max, use_rslora=False, rank_pattern=own_rank, alpha_pattern=own_rank)
    return legacy, folded


def plain_lora_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config with ``init_lora_weights: true``: a trained adapter is a plain LoRA over the unchanged base.

    An init name such as ``"gora"`` only chose the starting weights; servers refuse names they do not know.

    >>> plain_lora_config({"init_lora_weights": "gora"})["init_lora_weights"]
    True
    """
    init = config.get("init_lora_weights", True)
    if not isinstance(init, str):
        return config
    if init.lower().startswith(_BASE_MODIFYING_INITS):
        raise GoraError(f"the adapter was initialised with {printable(repr(init))}, which changes the base weights: convert it "
                        f"to a plain LoRA first (PEFT's path_initial_model_for_weight_conversion).")
    return dict(config, init_lora_weights=True)


def base_model_name(config: dict[str, Any], base: str | None) -> str:
    """`base` when given, else the base model the adapter records."""
    name = base or config.get("base_model_name_or_path")
    if not name:
        raise GoraError("the adapter does not record its base model (base_model_name_or_path): pass --base.")
    return name


def _head_size(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> int | None:
    """A classification adapter's number of labels: the output size of the head it saves."""
    for name in config.get("modules_to_save") or []:
        for key, tensor in tensors.items():
            if re.search(rf"(^|\.){re.escape(name)}(\.out_proj)?\.weight$", key):
                return int(tensor.shape[0])
    return None


def load_adapted_model(
    adapter_dir: str | os.PathLike, base: str | None = None, dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Base model + adapter as a PeftModel in eval mode on CPU, its tokenizer and the adapter config.

    The base loads through `goraplan.models.load_model`, so names resolve as everywhere else (built-in
    aliases, folders, Hub ids, ``OWNER/NAME@REVISION``) and no model code runs unless `trust_remote_code` is set.

    >>> model, tokenizer, config = load_adapted_model("runs/sarcasm")  # doctest: +SKIP
    """
    from peft import PeftModel

    from goraplan.models import load_model

    source = resolve_adapter(adapter_dir)
    config, tensors, _ = read_adapter(source.adapter_dir)
    task = adapter_task(config)
    labels: dict[str, Any] = {}
    if task == "seq-cls":
        num_labels = _head_size(config, tensors)
        names = source.label_names
        labels = ({"label_names": names} if names and len(names) == (num_labels or len(names))
                  else {"num_labels": num_labels})
    name = base_model_name(config, base)
    # The adapter's own base comes at the commit the adapter records (PEFT's `revision`), as PEFT loads it.
    revision = config.get("revision") if name == config.get("base_model_name_or_path") else None
    model, tokenizer = load_model(name, task, dtype=dtype, device="cpu", revision=revision,
                                  trust_remote_code=trust_remote_code, **labels)
    peft_model = PeftModel.from_pretrained(model, str(source.adapter_dir), is_trainable=False)
    peft_model.eval()
    return peft_model, tokenizer, config
