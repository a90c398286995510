"""One training run of one method, the same way for every method: the quality benchmark's harness.

A *workload* is a model + data + targets (MiniLM-L6 on the sarcasm headlines for NLU, SmolLM2-135M
on the prompt/completion version for NLG). A *run* is one method at one learning rate and one seed
on a workload. Every run goes through `train_and_evaluate`, which reads top to bottom:

    data order (seed) -> model (seed) -> method setup (PEFT config / GoRA plan) -> optimizer groups
    -> one epoch of AdamW with cosine decay and 3% warm-up -> evaluation on the held-out split

so that the only thing that differs between two methods is the method's own setup
(`METHODS[name]`): which parameters train, how the adapter starts, which learning rate each
parameter group gets (LoRA+ / GoRA's B/A ratio), and AdaLoRA's per-step rank update.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

# A run "collapses" when it predicts one class (NLU) or one answer token (NLG) for at least this share
# of the held-out set: the classifier has stopped reading its input.
COLLAPSE_SHARE = 0.95
WARMUP_RATIO = 0.03
MAX_GRAD_NORM = 1.0  # transformers.Trainer's default, for every method
WEIGHT_DECAY = 0.0  # for every method (peft's LoRA+ optimizer defaults to 0 as well)
LORA_RANK = 8  # r0: plain LoRA's rank, the parameter budget every adapter method gets
LORA_ALPHA = 16.0  # the same alpha for every adapter method
HELD_OUT_STEPS = 4  # K: batches after GoRA's N calibration batches that --step-size auto scores gamma on


# ---------------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class RunSpec:
    """Everything that identifies one run. The GoRA knobs are ignored by the other methods.

    >>> RunSpec("nlu", "gora", 1e-3, 0, ratio=1.0).run_id
    'nlu-gora-x1-lr0.001-s0'
    """

    workload: str  # "nlu" | "nlg" | "tiny"
    method: str  # a key of METHODS
    lr: float
    seed: int
    # GoRA (and, for ratio, nothing else: LoRA+ has its own fixed ratio 16)
    min_rank: int = 4
    max_rank: int = 32
    ratio: float = 16.0  # lr of every lora_B / lr of every lora_A
    gamma: float | str = 0.05  # GoRA's step size; 0 = GoRA's ranks with a zero B; "auto" = goraplan's search
    importance: str = "sensitivity"
    n_calib: int = 64  # N: calibration batches (GoRA, LoRA-GA)
    alpha: float = LORA_ALPHA
    b_lr_max: float | None = None  # gorafit's --lr-b-max: lora_B's lr capped (not below lr); None: no cap
    group: str = "main"  # main | ablation | nlg: which table the run belongs to

    @property
    def label(self) -> str:
        """The method with every knob that differs from its default, e.g. ``gora-x1-g0.2``."""
        if not self.method.startswith("gora"):
            return self.method if self.alpha == LORA_ALPHA else f"{self.method}-a{self.alpha:g}"
        base = RunSpec(self.workload, self.method, self.lr, self.seed)
        parts = [self.method]
        if self.method == "gora" and (self.min_rank, self.max_rank) != (base.min_rank, base.max_rank):
            parts.append(f"r{self.min_rank}-{self.max_rank}")
        parts.append(f"x{self.ratio:g}")
        if self.gamma != base.gamma:
            parts.append(f"g{self.gamma}" if isinstance(self.gamma, str) else f"g{self.gamma:g}")
        if self.importance != base.importance:
            parts.append(self.importance)
        if self.n_calib != base.n_calib:
            parts.append(f"n{self.n_calib}")
        if self.alpha != base.alpha:
            parts.append(f"a{self.alpha:g}")
        if self.b_lr_max is not None:
            parts.append(f"bmax{self.b_lr_max:g}")
        return "-".join(parts)

    @property
    def run_id(self) -> str:
        return f"{self.workload}-{self.label}-lr{self.lr:g}-s{self.seed}"


@dataclass
class Workload:
    """A model, its data and its targets; built once per process and shared by all its runs."""

    name: str
    task: str  # "seq-cls" | "causal-lm"
    load_model: Callable[[int], tuple[nn.Module, object]]  # seed -> (model in eval mode, tokenizer)
    train_rows: list[dict]  # tokenized: input_ids, attention_mask, labels
    eval_batches: list[dict]  # padded; for causal-lm: input_ids, attention_mask, last (index), target (token id)
    collate: Callable[[list[dict]], dict]
    targets: list[str]  # exact module paths, the same list for every adapter method
    batch_size: int = 32
    calib_batch_size: int = 8
    description: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return math.ceil(len(self.train_rows) / self.batch_size)


# ---------------------------------------------------------------------------------------------------- data
def epoch_batches(wl: Workload, seed: int) -> list[dict]:
    """One epoch in the seed's order: the same batches, in the same order, for every method."""
    order = torch.randperm(len(wl.train_rows), generator=torch.Generator().manual_seed(seed)).tolist()
    rows = [wl.train_rows[i] for i in order]
    return [wl.collate(rows[i:i + wl.batch_size]) for i in range(0, len(rows), wl.batch_size)]


def calibration_batches(wl: Workload, seed: int, n: int) -> list[dict]:
    """The first ``n * calib_batch_size`` training examples of the seed's order (GoRA's and LoRA-GA's N batches)."""
    order = torch.randperm(len(wl.train_rows), generator=torch.Generator().manual_seed(seed)).tolist()
    size = wl.calib_batch_size
    if n * size > len(order):
        raise ValueError(f"{n} calibration batches of {size} need {n * size} examples; the workload has {len(order)}")
    rows = [wl.train_rows[i] for i in order[: n * size]]
    return [wl.collate(rows[i:i + size]) for i in range(0, n * size, size)]


# ---------------------------------------------------------------------------------------------------- methods
@dataclass
class Setup:
    """What a method hands to the common loop."""

    model: nn.Module
    param_groups: list[dict] | None = None  # lr given as a multiple of the run's lr ("lr_mult")
    optimizer: torch.optim.Optimizer | None = None  # a method that builds its own (LoRA+ via peft)
    after_step: Callable[[int], None] | None = None  # AdaLoRA's rank update
    info: dict = field(default_factory=dict)


def _head(wl: Workload) -> list[str] | None:
    return ["classifier"] if wl.task == "seq-cls" else None


def _lora_config(wl: Workload, spec: RunSpec, **kwargs):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=LORA_RANK, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules=list(wl.targets), bias="none",
        modules_to_save=_head(wl), task_type=TaskType.SEQ_CLS if wl.task == "seq-cls" else TaskType.CAUSAL_LM,
        **kwargs,
    )


def _plain_groups(model: nn.Module) -> list[dict]:
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr_mult": 1.0}]


def _peft(model, config):
    from peft import get_peft_model

    return get_peft_model(model, config)


def setup_base(model, wl, spec, calib) -> Setup:
    """No training at all: the pretrained model as it is (the zero-shot reference of the NLG table)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return Setup(model, [])


def setup_full(model, wl, spec, calib) -> Setup:
    for p in model.parameters():
        p.requires_grad_(True)
    return Setup(model, _plain_groups(model))


def setup_lora(model, wl, spec, calib) -> Setup:
    model = _peft(model, _lora_config(wl, spec))
    return Setup(model, _plain_groups(model))


def setup_rslora(model, wl, spec, calib) -> Setup:
    model = _peft(model, _lora_config(wl, spec, use_rslora=True))
    return Setup(model, _plain_groups(model))


def setup_loraplus(model, wl, spec, calib) -> Setup:
    from peft.optimizers import create_loraplus_optimizer

    model = _peft(model, _lora_config(wl, spec))
    # peft's own LoRA+ optimizer, ratio 16 (its groups: lora_B and every 1-d parameter at 16 x lr).
    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=spec.lr, loraplus_lr_ratio=16.0,
                                          weight_decay=WEIGHT_DECAY)
    return Setup(model, optimizer=optimizer, info={"loraplus_ratio": 16.0})


def setup_pissa(model, wl, spec, calib) -> Setup:
    model = _peft(model, _lora_config(wl, spec, init_lora_weights="pissa"))
    return Setup(model, _plain_groups(model))


def setup_loraga(model, wl, spec, calib) -> Setup:
    from peft import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    config = _lora_config(wl, spec, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())

    def train_step():  # peft's callback: gradients accumulate over every call inside it
        for batch in calib:
            model(**batch).loss.backward()

    t0 = time.perf_counter()
    preprocess_loraga(model, config, train_step)
    prep = time.perf_counter() - t0
    model = _peft(model, config)
    return Setup(model, _plain_groups(model), info={"preprocess_s": prep, "calib_batches": len(calib)})


def setup_adalora(model, wl, spec, calib) -> Setup:
    from peft import AdaLoraConfig, TaskType

    steps = wl.steps
    # Start at rank 12 and prune to an average of 8 (LoRA's budget at the end), as in the AdaLoRA paper.
    config = AdaLoraConfig(
        init_r=12, target_r=LORA_RANK, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules=list(wl.targets),
        total_step=steps, tinit=max(1, round(0.1 * steps)), tfinal=max(1, round(0.2 * steps)),
        deltaT=max(1, steps // 20), modules_to_save=_head(wl),
        task_type=TaskType.SEQ_CLS if wl.task == "seq-cls" else TaskType.CAUSAL_LM,
    )
    model = _peft(model, config)
    return Setup(model, _plain_groups(model), after_step=lambda step: model.base_model.update_and_allocate(step),
                 info={"init_r": 12, "target_r": LORA_RANK})


PLAN_CACHE: Path | None = None  # a folder for built plans (they do not depend on lr), or None


def gora_plan(model, wl: Workload, spec: RunSpec, calib: list[dict]):
    """The GoRA plan of `spec` (cached on disk: every lr of a seed shares it)."""
    from goraplan import PlanSettings, build_plan, load_plan

    r_min, r_max = (LORA_RANK, LORA_RANK) if spec.method == "gora-fixed" else (spec.min_rank, spec.max_rank)
    settings = PlanSettings(
        task=wl.task, target_modules=list(wl.targets), rank=LORA_RANK, min_rank=r_min, max_rank=r_max, alpha=spec.alpha, step_size=spec.gamma if spec.gamma == "auto" or spec.gamma > 0 else 0.05, held_out_steps=HELD_OUT_STEPS,
        steps=spec.n_calib, batch_size=wl.calib_batch_size, importance=spec.importance, seed=spec.seed,
    )
    # held_out_steps only matters to step_size "auto"; leaving it out otherwise keeps older cache keys valid
    dump = settings.model_dump_json(exclude=None if spec.gamma == "auto" else {"held_out_steps"})
    key = hashlib.sha256(f"{wl.name}|{wl.description}|{dump}".encode()).hexdigest()[:16]
    path = PLAN_CACHE / f"{wl.name}-{key}.gora" if PLAN_CACHE else None
    if path is not None and path.is_file():
        return load_plan(path), 0.0, True
    t0 = time.perf_counter()
    plan = build_plan(model, calib[: settings.batches_needed], settings, model_name=wl.name)
    seconds = time.perf_counter() - t0
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        plan.save(path)
    return plan, seconds, False


def _apply_plan():
    """gorafit.apply_plan; loaded from its file when ``import gorafit`` fails (its package __init__ also
    imports the HF Trainer, which a half-installed DeepSpeed/accelerate pair can break)."""
    try:
        from gorafit import apply_plan

        return apply_plan, "gorafit.apply_plan"
    except ImportError:
        import importlib.util
        import sys

        path = Path(__file__).resolve().parents[2] / "gorafit" / "apply.py"
        spec = importlib.util.spec_from_file_location("_gorafit_apply", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["_gorafit_apply"] = module
        spec.loader.exec_module(module)
        return module.apply_plan, "gorafit/apply.py (loaded by path)"


def ratio_groups(model: nn.Module, ratio: float) -> list[dict]:
    """GoRA's optimizer groups (as gorafit.train.lora_plus_param_groups): every lora_B at ratio x lr,
    everything else that trains (lora_A, the head) at lr."""
    b = [p for n, p in model.named_parameters() if p.requires_grad and ".lora_B." in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and ".lora_B." not in n]
    return [{"params": rest, "lr_mult": 1.0}, {"params": b, "lr_mult": ratio}]


def setup_gora(model, wl, spec, calib) -> Setup:
    apply_plan, impl = _apply_plan()
    plan, plan_s, cached = gora_plan(model, wl, spec, calib)
    model = apply_plan(model, plan)
    if spec.gamma == 0:  # ablation: GoRA's ranks, but B starts at zero like plain LoRA
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.zero_()
    from gorafit.settings import effective_lr_ratio  # the rule gorafit run applies

    groups = ratio_groups(model, effective_lr_ratio(spec.lr, spec.ratio, spec.b_lr_max))
    ranks = plan.ranks
    return Setup(model, groups, info={
        "apply_plan": impl, "plan_s": plan_s, "plan_cached": cached, "ranks": ranks, "rank_min": min(ranks.values()),
        "rank_max": max(ranks.values()), "budget": plan.manifest.totals.budget,
        "allocated": plan.manifest.totals.allocated, "calib_batches": spec.n_calib,
        "calib_loss": plan.manifest.calibration.mean_loss, "step_size": plan.manifest.step_size,
        "step_size_search": (plan.manifest.step_size_search.model_dump()
                             if plan.manifest.step_size_search else None),
    })


METHODS: dict[str, Callable[..., Setup]] = {
    "base": setup_base,
    "full": setup_full,
    "lora": setup_lora,
    "rslora": setup_rslora,
    "loraplus": setup_loraplus,
    "pissa": setup_pissa,
    "loraga": setup_loraga,
    "adalora": setup_adalora,
    "gora-fixed": setup_gora,  # min = max = 8: GoRA's init alone
    "gora": setup_gora,
}
NEEDS_CALIBRATION = ("loraga", "gora-fixed", "gora")


# ---------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, wl: Workload) -> dict:
    """Accuracy (NLU) or exact match of the greedy first answer token (NLG) on the held-out batches."""
    model.eval()
    predictions, targets, losses = [], [], []
    for batch in wl.eval_batches:
        if wl.task == "seq-cls":
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            predictions.append(out.logits.argmax(-1))
            targets.append(batch["labels"])
            losses.append(out.loss.item() * len(batch["labels"]))
        else:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            last = logits[torch.arange(len(batch["last"])), batch["last"]].float()
            predictions.append(last.argmax(-1))
            targets.append(batch["target"])
            losses.append(nn.functional.cross_entropy(last, batch["target"], reduction="sum").item())
    pred, gold = torch.cat(predictions), torch.cat(targets)
    values, counts = pred.unique(return_counts=True)
    top = counts.argmax()
    majority_share = counts[top].item() / len(pred)
    return {
        "accuracy": (pred == gold).float().mean().item(),
        "eval_loss": sum(losses) / len(pred),
        "examples": len(pred),
        "majority_prediction": int(values[top]),
        "majority_share": majority_share,
        "collapsed": majority_share >= COLLAPSE_SHARE,
        "gold_majority_share": gold.unique(return_counts=True)[1].max().item() / len(gold),
    }


def adapter_delta_norm(model: nn.Module) -> float | None:
    """Mean over adapted modules of ||s * B @ A||_F / ||W||_F after training (how far the adapter moved W)."""
    ratios = []
    for module in model.modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if lora_a is None or "default" not in lora_a or not hasattr(module, "get_base_layer"):
            continue
        a, b = lora_a["default"], lora_b["default"]
        if not (isinstance(a, nn.Linear) and isinstance(b, nn.Linear)):
            continue  # AdaLoRA keeps A, E, B as bare parameters; skip
        a, b = a.weight, b.weight
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            continue  # AdaLoRA keeps A, E, B separately; skip
        delta = module.scaling["default"] * (b @ a)
        ratios.append((delta.norm() / module.get_base_layer().weight.norm()).item())
    return sum(ratios) / len(ratios) if ratios else None


# ---------------------------------------------------------------------------------------------------- one run
def train_and_evaluate(wl: Workload, spec: RunSpec, *, log_every: int = 1) -> dict:
    """Train `spec.method` for one epoch of `wl` at `spec.lr` with `spec.seed`; return the run's record."""
    torch.manual_seed(spec.seed)

    # ---- data: the seed's order, the same for every method
    batches = epoch_batches(wl, spec.seed)
    n_calib = spec.n_calib + (HELD_OUT_STEPS if spec.gamma == "auto" and spec.method.startswith("gora") else 0)
    calib = calibration_batches(wl, spec.seed, n_calib) if spec.method in NEEDS_CALIBRATION else []

    # ---- model and method
    model, _ = wl.load_model(spec.seed)
    t_setup = time.perf_counter()
    setup = METHODS[spec.method](model, wl, spec, calib)
    setup_s = time.perf_counter() - t_setup
    model = setup.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # ---- optimizer: AdamW, cosine decay with 3% warm-up over one epoch
    if setup.optimizer is not None:
        optimizer = setup.optimizer
    elif not setup.param_groups:  # "base": nothing trains
        batches, optimizer = [], None
    else:
        groups = [{"params": g["params"], "lr": spec.lr * g["lr_mult"], "weight_decay": g.get("weight_decay", WEIGHT_DECAY)}
                  for g in setup.param_groups]
        optimizer = torch.optim.AdamW(groups, lr=spec.lr, weight_decay=WEIGHT_DECAY)
    steps = len(batches)
    if optimizer is not None:
        scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(WARMUP_RATIO * steps), steps)
        params = [p for g in optimizer.param_groups for p in g["params"]]

    # ---- one epoch
    model.train()
    losses: list[float] = []
    t_train = time.perf_counter()
    for step, batch in enumerate(batches):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        if setup.after_step is not None:
            setup.after_step(step)
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps - 1:
            losses.append(round(loss.item(), 5))
    train_s = time.perf_counter() - t_train

    # ---- held-out evaluation
    t_eval = time.perf_counter()
    metrics = evaluate(model, wl)
    eval_s = time.perf_counter() - t_eval
    loss_finite = all(math.isfinite(x) for x in losses)
    return {
        "run_id": spec.run_id,
        "spec": asdict(spec),
        "label": spec.label,
        "workload": wl.name,
        **metrics,
        "trainable_params": trainable,
        "steps": steps,
        "train_examples": len(wl.train_rows),
        "batch_size": wl.batch_size,
        "setup_s": round(setup_s, 3),
        "train_s": round(train_s, 3),
        "eval_s": round(eval_s, 3),
        "time_s": round(setup_s + train_s, 3),  # what the method costs: its preparation + the epoch
        "train_loss": losses,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "loss_finite": loss_finite,
        "adapter_delta_ratio": adapter_delta_norm(model),
        "method_info": setup.info,
    }


def with_lr(spec: RunSpec, lr: float) -> RunSpec:
    return replace(spec, lr=lr)


def write_json(path: Path, record: dict) -> None:
    """Atomic: a run file exists only once complete, so a resumed grid never reads half a run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)
