"""A plan on a model: the standard PEFT LoRA adapter the plan describes, with the plan's initial A and B.

The adapter is plain PEFT: ``LoraConfig(r=r0, lora_alpha=alpha, use_rslora=True, rank_pattern=...)``,
so module i adds ``s_i * B_i @ A_i`` with ``s_i = alpha / sqrt(r_i)`` (docs/method.md §4) to its
untouched base weight. Only the values of A and B differ from a fresh LoRA: they are the plan's.
"""

from __future__ import annotations

import contextlib
import math

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from torch import nn

from goraplan.errors import GoraError
from goraplan.match import check_model_matches
from goraplan.plan import Plan

__all__ = ["HEAD_NAMES", "apply_plan", "lora_config_for", "head_name", "plan_lora_config"]

# Classification heads that PEFT trains and saves beside the adapter (``modules_to_save``).
HEAD_NAMES = ("classifier", "score")


def head_name(model: nn.Module) -> str:
    """The attribute name of a sequence-classification model's head: ``classifier`` or ``score``.

    >>> head_name(BertForSequenceClassification(config))  # doctest: +SKIP
    'classifier'
    """
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise GoraError(
        f"the seq-cls model {type(model).__name__} has no classification head named "
        f"{' or '.join(HEAD_NAMES)}; load it with AutoModelForSequenceClassification"
    )


def lora_config_for(plan: Plan, model: nn.Module | None = None) -> LoraConfig:
    """The PEFT ``LoraConfig`` of a plan (`plan_lora_config`), for tools that take ``peft_config=``.

    A ``LoraConfig`` carries ranks and scalings, not tensors: a model built from it starts with PEFT's own
    A and zero B, not GoRA's initial adapter, so this warns every time. To keep GoRA's start, wrap the model
    with `apply_plan`, or give the tool the folder of ``gorafit export PLAN.gora --format peft -o DIR``.

    >>> config = lora_config_for(load_plan("plan.gora"))  # doctest: +SKIP
    UserWarning: lora_config_for(plan) keeps the plan's ranks but drops its initial A and B ...
    """
    import warnings

    warnings.warn(
        "lora_config_for(plan) keeps the plan's ranks and scalings but drops its initial A and B (PEFT starts B at "
        "zero): use gorafit.apply_plan(model, plan), or pass the folder of `gorafit export PLAN.gora --format peft "
        "-o DIR` as the adapter path (PeftModel.from_pretrained(base, DIR, is_trainable=True), axolotl's "
        "lora_model_dir, LLaMA-Factory's adapter_name_or_path)",
        UserWarning,
        stacklevel=2,
    )
    return plan_lora_config(plan, model)


def plan_lora_config(plan: Plan, model: nn.Module | None = None) -> LoraConfig:
    """The PEFT ``LoraConfig`` of a plan: r0, alpha, rsLoRA scaling, per-module ranks, exact module paths
    (what `apply_plan` wraps the model with before it copies the plan's A and B in).

    For ``seq-cls`` the classification head of ``model`` is trained and saved with the adapter.

    >>> plan_lora_config(load_plan("plan.gora")).rank_pattern  # doctest: +SKIP
    {'model\\\\.layers\\\\.0\\\\.self_attn\\\\.q_proj': 12, ...}
    """
    manifest = plan.manifest
    seq_cls = manifest.task == "seq-cls"
    modules_to_save = [head_name(model)] if (seq_cls and model is not None) else (["classifier"] if seq_cls else None)
    return LoraConfig(
        r=manifest.settings.rank,
        lora_alpha=manifest.settings.alpha,
        use_rslora=True,
        # The exact paths the plan adapts, so PEFT adapts those modules and no others.
        target_modules=[m.name for m in manifest.modules],
        rank_pattern=plan.rank_pattern,
        init_lora_weights=True,
        lora_dropout=0.0,
        bias="none",
        task_type=TaskType.SEQ_CLS if seq_cls else TaskType.CAUSAL_LM,
        modules_to_save=modules_to_save,
        # The base model's commit, written into adapter_config.json: PEFT loads the base at it.
        revision=manifest.base_model.revision,
    )


def apply_plan(model: nn.Module, plan: Plan, *, check_fingerprint: bool = True, adapter_name: str = "default") -> PeftModel:
    """Wrap ``model`` in the PEFT LoRA adapter of ``plan``, initialised with the plan's A and B.

    First checks that ``model`` is the model the plan was built on (module names, shapes and, unless
    ``check_fingerprint=False``, the weights' fingerprint). The base weights are not changed; the
    caller's random state is left as it was.

    >>> model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M")  # doctest: +SKIP
    >>> peft_model = apply_plan(model, load_plan("plan.gora"))                         # doctest: +SKIP
    >>> peft_model.print_trainable_parameters()                                         # doctest: +SKIP
    """
    with _gathered_targets(model, plan):
        check_model_matches(plan, model, check_fingerprint=check_fingerprint)
    if plan.manifest.task == "seq-cls":
        head = head_name(model)
        inside_head = [m.name for m in plan.manifest.modules if m.name == head or m.name.startswith(head + ".")]
        if inside_head:
            raise GoraError(
                f"the plan adapts {inside_head[0]}, which lies inside the classification head {head!r} that is "
                "trained in full; rebuild the plan with target modules that leave the head out"
            )
    config = plan_lora_config(plan, model)

    # PEFT draws a random A for each module (kaiming) before we overwrite it: keep the caller's RNG as it was.
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    # PEFT keeps target_modules as a set; a list in the plan's order makes adapter_config.json reproducible.
    peft_model.peft_config[adapter_name].target_modules = [m.name for m in plan.manifest.modules]
    _copy_plan_weights(peft_model, plan, adapter_name)
    return peft_model


def _gathered_targets(model: nn.Module, plan: Plan):
    """Under DeepSpeed ZeRO-3 (weights partitioned while loading) the fingerprint needs the whole weights:
    gather the planned modules' weights for the check (a collective: every process calls it)."""
    weights = []
    for entry in plan.manifest.modules:
        try:
            weights.append(model.get_submodule(entry.name).weight)
        except AttributeError:  # a missing module: check_model_matches names it
            continue
    if not any(hasattr(w, "ds_id") for w in weights):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(weights, modifier_rank=None)


def _copy_plan_weights(peft_model: PeftModel, plan: Plan, adapter_name: str) -> None:
    base = peft_model.get_base_model()
    with torch.no_grad():
        for entry in plan.manifest.modules:
            layer = base.get_submodule(entry.name)
            lora_a = getattr(layer, "lora_A", None)
            if lora_a is None or adapter_name not in lora_a:
                raise GoraError(
                    f"PEFT did not put a LoRA adapter on {entry.name}; check that the plan's target modules are "
                    "plain linear layers of this model"
                )
            a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            plan_a, plan_b = plan.lora_a(entry.name), plan.lora_b(entry.name)
            if a.shape != plan_a.shape or b.shape != plan_b.shape:
                raise GoraError(
                    f"{entry.name}: PEFT made A {list(a.shape)} and B {list(b.shape)} but the plan holds "
                    f"{list(plan_a.shape)} and {list(plan_b.shape)}; the rank pattern did not apply"
                )
            scaling = layer.scaling[adapter_name]
            if not math.isclose(scaling, entry.scaling, rel_tol=1e-6):
                raise GoraError(
                    f"{entry.name}: PEFT scales the adapter by {scaling:g} but the plan expects {entry.scaling:g} "
                    "(alpha / sqrt(rank)); this PEFT version does not apply use_rslora as expected"
                )
            a.copy_(plan_a.to(device=a.device, dtype=a.dtype))
            b.copy_(plan_b.to(device=b.device, dtype=b.dtype))
