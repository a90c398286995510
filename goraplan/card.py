"""A plan card: the Hub-ready folder a plan travels in (``goraplan card``; ``goraplan push`` uploads the same).

::

    DIR/plan.gora         the plan, byte for byte
    DIR/README.md         model card (huggingface_hub ModelCard): YAML metadata, what the plan is, how to use it
    DIR/ranks.png         rank per layer, one line per module type
    DIR/provenance.json   settings, calibration data and its fingerprint, budget, tool version, plan sha256

Every string that came from the plan file is passed through `goraplan.untrusted.printable` before it is
written into the card's text, so a plan cannot smuggle terminal escapes or line breaks into it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import statistics
from pathlib import Path
from typing import Any

from goraplan.errors import GoraError
from goraplan.hub import PLAN_FILENAME, parse_repo_ref, resolve_plan_source
from goraplan.plan import Plan, load_plan
from goraplan.untrusted import printable

__all__ = ["CARD_FILES", "provenance", "card_metadata", "usage_commands", "card_text", "write_card"]

CARD_FILES = (PLAN_FILENAME, "README.md", "ranks.png", "provenance.json")
LIBRARY_NAME = "goraplan"
PLACEHOLDER_REPO = "OWNER/NAME"


def provenance(plan: Plan) -> dict[str, Any]:
    """What a reader needs to trust and reproduce the plan, as plain JSON-ready data."""
    man = plan.manifest
    ranks = [m.rank for m in man.modules]
    return {
        "plan_sha256": plan.sha256,
        "tool_version": man.tool_version,
        "schema_version": man.schema_version,
        "created_at": man.created_at,
        "base_model": man.base_model.model_dump(mode="json"),
        "task": man.task,
        "labels": man.labels,
        "target_modules": man.target_modules,
        "settings": man.settings.model_dump(mode="json"),
        "step_size": man.step_size,
        "calibration": man.calibration.model_dump(mode="json"),
        "budget": man.totals.model_dump(mode="json"),
        "ranks": {"modules": len(ranks), "min": min(ranks), "max": max(ranks), "mean": statistics.mean(ranks)},
        "ranks_from": man.ranks_from.model_dump(mode="json") if man.ranks_from else None,
    }


def card_metadata(plan: Plan):
    """The card's YAML header: base_model (a Hub id only) with its revision, library, tags, data set."""
    from huggingface_hub import ModelCardData

    from goraplan.models import is_hub_id

    man = plan.manifest
    base = man.base_model
    source = man.calibration.source
    return ModelCardData(
        base_model=base.name_or_path if is_hub_id(base.name_or_path) else None,
        base_model_revision=base.revision,
        library_name=LIBRARY_NAME,
        tags=["gora", "lora", "peft", "adapter-plan", man.task],
        datasets=[source] if source and _is_hub_dataset(source) else None,
        gora={
            "plan_sha256": plan.sha256,
            "base_model": base.name_or_path,
            "base_model_fingerprint": base.fingerprint,
            "calibration_token_fingerprint": man.calibration.token_fingerprint,
            "schema_version": man.schema_version,
        },
    )


def usage_commands(plan: Plan, repo_id: str | None = None, revision: str | None = None) -> dict[str, str]:
    """The commands that use the plan once it is on the Hub: train, export, serve (and plan again on new data)."""
    from gorafit.vllm_serving import lora_target_modules, vllm_serve_command

    repo = repo_id or PLACEHOLDER_REPO
    source = f"{repo}@{revision}" if revision else repo
    name = repo.split("/")[-1]
    base = plan.manifest.base_model
    # The model name comes from the file: inert (printable) and one shell word (quoted) in a command to paste.
    serve = vllm_serve_command(base.name_or_path, f"out/{name}-adapter", max(plan.ranks.values()), name,
                               target_modules=lora_target_modules(plan.ranks), revision=base.revision)
    from goraplan.models import MODEL_ALIASES, is_hub_id

    model = shlex.quote(printable(base.name_or_path))
    pinned = f"{model} --revision {shlex.quote(printable(base.revision))}" if base.revision else model
    # A plan built on a local folder names a path that the reader's machine does not have.
    local = not (is_hub_id(base.name_or_path) or base.name_or_path in MODEL_ALIASES)
    train_model = " --model YOUR_COPY_OF_THE_BASE_MODEL" if local else ""
    return {
        "train": f"gorafit run {source}{train_model} -o runs/{name}",
        "export": f"gorafit export runs/{name} --format peft -o out/{name}-adapter",
        "serve": serve,
        "ranks_on_your_data": f"goraplan build --model {'YOUR_COPY_OF_THE_BASE_MODEL' if local else pinned} "
                              f"--ranks-from {source} --data YOUR_DATA -o {name}-yours.gora",
    }


def card_text(plan: Plan, repo_id: str | None = None, revision: str | None = None) -> str:
    """README.md of the card: YAML metadata, then what the plan is, how to use it and where it came from."""
    from goraplan import report

    man = plan.manifest
    base, cal, s, t = man.base_model, man.calibration, man.settings, man.totals
    ranks = [m.rank for m in man.modules]
    commands = usage_commands(plan, repo_id, revision)
    model = printable(base.name_or_path)
    data = printable(cal.source) if cal.source else "batches given in Python"
    lines = [
        f"# GoRA plan for {model}",
        "",
        f"A GoRA allocation plan: per-layer LoRA ranks and the initial adapter, computed from the gradients of "
        f"`{model}` on `{data}`. It adapts {len(ranks)} modules with ranks {min(ranks)} to {max(ranks)}, "
        f"{t.allocated:,} trainable parameters against plain LoRA r={s.rank}'s {t.lora_equivalent:,}.",
        "",
        f"`{PLAN_FILENAME}` is a safetensors file: the tensors are each module's `lora_A` and `lora_B`, and the "
        "JSON manifest in its header says everything below; it can be read with `safetensors` and `json` alone.",
        "",
        "## Use it",
        "",
        "```bash",
        "pip install goraplan",
        "# train on the plan's own data (add --data YOUR_DATA for yours), export for vLLM/PEFT, serve",
        commands["train"],
        commands["export"],
        commands["serve"],
        "```",
        "",
        "To keep these ranks but plan the initial adapter on your own data:",
        "",
        "```bash",
        commands["ranks_on_your_data"],
        "```",
        "",
        "## Ranks",
        "",
        "![rank per layer](ranks.png)",
        "",
        "```text",
        *[printable(line) for line in report.type_table_lines(plan)],
        "```",
        "",
        "## Provenance",
        "",
        "| | |",
        "|---|---|",
        _row("base model", f"`{model}` ({printable(base.architecture)}, {printable(base.dtype)})"),
        _row("base model revision", f"`{printable(base.revision)}`" if base.revision else "not a Hub model"),
        _row("base weights fingerprint", f"`{printable(base.fingerprint)}`"),
        _row("task", man.task + (f" (labels: {printable(', '.join(man.labels))})" if man.labels else "")),
        _row("calibration data", f"`{data}` [{printable(cal.split)}]: {cal.steps} steps, {cal.examples} examples, "
             f"{cal.tokens:,} tokens, base loss {cal.mean_loss:.4f}"),
        _row("calibration fingerprint", f"`{printable(cal.token_fingerprint)}`"),
        _row("settings", f"r0={s.rank}, ranks {s.min_rank}..{s.max_rank}, alpha={s.alpha:g}, "
             f"gamma={man.step_size:g}{' (auto)' if man.step_size_search else ''}, importance={s.importance}, "
             f"allocation={s.allocation}, steps={s.steps}, batch size={s.batch_size}, max length={s.max_length}, "
             f"seed={s.seed}"),
        _row("budget", f"{t.allocated:,} of {t.budget:,} parameters (ratio {t.ratio:.4f})"),
    ]
    if man.ranks_from:
        rf = man.ranks_from
        lines.append(_row("ranks from", f"`{printable(rf.source)}` (sha256 `{printable(rf.plan_sha256)}`, "
                          f"allocated on `{printable(rf.calibration_source)}`)"))
    lines += [
        _row("plan sha256", f"`{plan.sha256}`"),
        _row("made with", f"goraplan {printable(man.tool_version)}, plan schema v{man.schema_version}, "
             f"{printable(man.created_at)}"),
        "",
        "`provenance.json` holds the same, machine-readable.",
        "",
    ]
    from huggingface_hub import ModelCard

    return str(ModelCard(f"---\n{card_metadata(plan).to_yaml()}\n---\n\n" + "\n".join(lines)))


def write_card(plan_source: str | os.PathLike, out_dir: str | os.PathLike, *, repo_id: str | None = None,
               revision: str | None = None, overwrite: bool = False) -> Path:
    """Write the plan card folder for `plan_source` (a file or ``OWNER/NAME[@REVISION]``) into `out_dir`.

    The folder appears complete or not at all, and never inside or over the plan it is made from.

    >>> write_card("plan.gora", "card", repo_id="team-a/sarcasm-plan")  # doctest: +SKIP
    PosixPath('card')
    """
    from goraplan.files import file_sha256, staged_dir, write_json_atomic
    from goraplan.report import plot_ranks

    if repo_id is not None and (parse_repo_ref(repo_id) is None or "@" in repo_id):
        raise GoraError(f"--repo {repo_id!r} is not a Hub repository id: give OWNER/NAME (the branch goes in --revision).")
    plan_path = resolve_plan_source(plan_source)
    plan = load_plan(plan_path)
    with staged_dir(out_dir, overwrite=overwrite, inputs=[plan_path]) as tmp:
        shutil.copyfile(plan_path, tmp / PLAN_FILENAME)
        if file_sha256(tmp / PLAN_FILENAME) != plan.sha256:
            raise GoraError(f"{printable(plan_path)} changed while the card was being written: write the card again.")
        try:
            plot_ranks(plan, str(tmp / "ranks.png"))
        except ImportError:
            raise GoraError("the plan card's rank picture needs matplotlib: pip install 'goraplan[plot]'.") from None
        write_json_atomic(tmp / "provenance.json", provenance(plan))
        (tmp / "README.md").write_text(card_text(plan, repo_id, revision), encoding="utf-8")
    return Path(out_dir)


def _row(key: str, value: str) -> str:
    return f"| {key} | {value.replace('|', '&#124;')} |"


def _is_hub_dataset(source: str) -> bool:
    """A Hub data set id (OWNER/NAME), not a built-in alias or a file or folder of this machine."""
    from goraplan.data import DATA_ALIASES
    from goraplan.models import looks_like_path

    return "/" in source and source not in DATA_ALIASES and not looks_like_path(source) and not Path(source).exists()
