"""One training run of one method, the same way for every method: the quality benchmark's harness.

A *workload* (workloads.py) is a model + data + targets. A *run* is one method at one learning rate
(or ``auto``) and one seed on a workload. Every run goes through `train_and_evaluate`, which reads
top to bottom:

    data order (seed) -> model (seed) -> method setup (PEFT config / GoRA plan) -> optimizer factory
    -> [lr auto: gorafit.lr_finder's range test on training batches] -> one epoch of AdamW with cosine
    decay and 3% warm-up -> evaluation on the held-out test split

so that the only thing that differs between two methods is the method's own setup (`METHODS[name]`):
which parameters train, how the adapter starts, and which lr multiplier each parameter group gets
(LoRA+ / GoRA's B/A ratio).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from benchmarks.quality.grid import LORA_ALPHA, LORA_RANK, RunSpec
from gorafit.lr_finder import LrSearch, hessian_top_eigenvalue, search_training_data

# A run "collapses" when it predicts one class (NLU) or one answer (NLG) for at least this share of the
# held-out set: it has stopped reading its input.
COLLAPSE_SHARE = 0.95
WARMUP_RATIO = 0.03
MAX_GRAD_NORM = 1.0  # transformers.Trainer's default, for every method
WEIGHT_DECAY = 0.0  # for every method (peft's LoRA+ optimizer defaults to 0 as well)
AUTO_SHARE = 0.10  # the range test may cost at most this share of the run it serves
AUTO_CANDIDATES = 7  # the range test's usual number of short runs, for sizing its steps


@dataclass
class Workload:
    """A model, its data and its targets; built once per process and shared by all its runs."""

    name: str
    task: str  # "seq-cls" | "causal-lm"
    load_model: Callable[[int], tuple[nn.Module, object]]  # seed -> (model in eval mode, tokenizer)
    train_rows: list[dict]  # tokenized: input_ids, attention_mask, labels
    evaluate: Callable[[nn.Module], dict]  # the held-out test score (accuracy, eval_loss, collapse ...)
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
def _order(wl: Workload, seed: int) -> list[int]:
    return torch.randperm(len(wl.train_rows), generator=torch.Generator().manual_seed(seed)).tolist()


def _batches(wl: Workload, indices: list[int], size: int) -> list[dict]:
    rows = [wl.train_rows[i] for i in indices]
    return [wl.collate(rows[i:i + size]) for i in range(0, len(rows), size)]


def epoch_batches(wl: Workload, seed: int) -> list[dict]:
    """One epoch in the seed's order: the same batches, in the same order, for every method."""
    return _batches(wl, _order(wl, seed), wl.batch_size)


def calibration_batches(wl: Workload, seed: int, n: int) -> list[dict]:
    """The first ``n * calib_batch_size`` training examples of the seed's order (GoRA's and LoRA-GA's N batches)."""
    size = wl.calib_batch_size
    if n * size > len(wl.train_rows):
        raise ValueError(f"{n} calibration batches of {size} need {n * size} examples; the workload has "
                         f"{len(wl.train_rows)}")
    return _batches(wl, _order(wl, seed)[: n * size], size)


# ---------------------------------------------------------------------------------------------------- methods
@dataclass
class Setup:
    """What a method hands to the common loop."""

    model: nn.Module
    make_optimizer: Callable[[float], torch.optim.Optimizer]  # base lr -> AdamW over the method's groups
    multipliers: Callable[[float], list[tuple[list[nn.Parameter], float]]]  # base lr -> (params, lr multiplier)
    info: dict = field(default_factory=dict)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adamw_setup(model: nn.Module, groups: Callable[[float], list[tuple[list[nn.Parameter], float]]],
                info: dict | None = None) -> Setup:
    """AdamW over `groups(lr)`: (parameters, lr multiplier) pairs."""

    def make(lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW([{"params": ps, "lr": lr * m} for ps, m in groups(lr) if ps], lr=lr,
                                 weight_decay=WEIGHT_DECAY)

    return Setup(model, make, groups, info or {})


def _one_group(model: nn.Module) -> Callable[[float], list]:
    params = _trainable(model)
    return lambda lr: [(params, 1.0)]


def _head(wl: Workload) -> list[str] | None:
    return ["classifier"] if wl.task == "seq-cls" else None


def _lora_config(wl: Workload, **kwargs):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(wl.targets), bias="none",
        modules_to_save=_head(wl), task_type=TaskType.SEQ_CLS if wl.task == "seq-cls" else TaskType.CAUSAL_LM,
        **kwargs,
    )


def _peft(model, config):
    from peft import get_peft_model

    return get_peft_model(model, config)


def setup_full(model, wl, spec, calib) -> Setup:
    for p in model.parameters():
        p.requires_grad_(True)
    return adamw_setup(model, _one_group(model))


def setup_lora(model, wl, spec, calib) -> Setup:
    model = _peft(model, _lora_config(wl))
    return adamw_setup(model, _one_group(model))


def setup_rslora(model, wl, spec, calib) -> Setup:
    model = _peft(model, _lora_config(wl, use_rslora=True))
    return adamw_setup(model, _one_group(model))


def setup_loraplus(model, wl, spec, calib) -> Setup:
    from peft.optimizers import create_loraplus_optimizer

    model = _peft(model, _lora_config(wl))
    ratio = 16.0

    def make(lr: float) -> torch.optim.Optimizer:  # peft's own LoRA+ optimizer (lora_B and 1-d params at 16 x lr)
        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                         weight_decay=WEIGHT_DECAY)

    def groups(lr: float):
        opt = make(lr)
        return [(g["params"], g["lr"] / lr) for g in opt.param_groups]

    return Setup(model, make, groups, info={"loraplus_ratio": ratio, "optimizer": "peft create_loraplus_optimizer"})


def setup_pissa(model, wl, spec, calib) -> Setup:
    model = _peft(model, _lora_config(wl, init_lora_weights="pissa"))
    return adamw_setup(model, _one_group(model))


def setup_loraga(model, wl, spec, calib) -> Setup:
    from peft import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    config = _lora_config(wl, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())

    def train_step():  # peft's callback: gradients accumulate over every call inside it
        for batch in calib:
            model(**batch).loss.backward()

    t0 = time.perf_counter()
    preprocess_loraga(model, config, train_step)
    prep = time.perf_counter() - t0
    model = _peft(model, config)
    return adamw_setup(model, _one_group(model), {"preprocess_s": prep, "calib_batches": len(calib)})


PLAN_CACHE: Path | None = None  # a folder for built plans (they do not depend on lr), or None


def gora_plan(model, wl: Workload, spec: RunSpec, calib: list[dict]):
    """The GoRA plan of `spec` (cached on disk: every lr of a seed shares it)."""
    from goraplan import PlanSettings, build_plan, load_plan
    from goraplan.errors import GoraError

    settings = PlanSettings(
        task=wl.task, target_modules=list(wl.targets), rank=LORA_RANK, min_rank=spec.min_rank,
        max_rank=spec.max_rank, alpha=LORA_ALPHA, step_size=spec.gamma, steps=spec.n_calib,
        batch_size=wl.calib_batch_size, seed=spec.seed,
    )
    key = hashlib.sha256(f"{wl.name}|{wl.description}|{settings.model_dump_json()}".encode()).hexdigest()[:16]
    path = PLAN_CACHE / f"{wl.name}-{key}.gora" if PLAN_CACHE else None
    if path is not None and path.is_file():
        try:
            return load_plan(path), 0.0, True
        except GoraError:  # a plan the current format rejects (e.g. written by an older goraplan): rebuild
            pass
    t0 = time.perf_counter()
    plan = build_plan(model, calib[: settings.batches_needed], settings, model_name=wl.name)
    seconds = time.perf_counter() - t0
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        plan.save(path)
    return plan, seconds, False


def setup_gora(model, wl, spec, calib) -> Setup:
    from gorafit import apply_plan, create_optimizer
    from gorafit.optim import effective_lr_ratio

    plan, plan_s, cached = gora_plan(model, wl, spec, calib)
    model = apply_plan(model, plan)

    head = {id(p) for name, p in model.named_parameters() if p.requires_grad and "modules_to_save" in name}

    def make(lr: float) -> torch.optim.Optimizer:  # gorafit run's optimizer: lora_B at the (capped) ratio x lr
        optimizer = create_optimizer(model, lr, lr_ratio=spec.ratio, lr_b_max=spec.b_lr_max, weight_decay=WEIGHT_DECAY)
        if spec.head_lr != "b" or not head:
            return optimizer
        b_lr = lr * effective_lr_ratio(lr, spec.ratio, spec.b_lr_max)  # the ablation: the head at lora_B's lr
        groups = []
        for g in optimizer.param_groups:
            rest = [p for p in g["params"] if id(p) not in head]
            moved = [p for p in g["params"] if id(p) in head]
            settings = {k: v for k, v in g.items() if k != "params"}
            groups += [{**settings, "params": rest}] if rest else []
            groups += [{**settings, "params": moved, "lr": b_lr, "name": "head"}] if moved else []
        return torch.optim.AdamW(groups, lr=lr, weight_decay=WEIGHT_DECAY)

    def groups(lr: float):
        return [(g["params"], g["lr"] / lr) for g in make(lr).param_groups]

    ranks = plan.ranks
    return Setup(model, make, groups, {
        "optimizer": "gorafit.create_optimizer", "plan_s": plan_s, "plan_cached": cached,
        "rank_min": min(ranks.values()), "rank_max": max(ranks.values()), "budget": plan.manifest.totals.budget,
        "allocated": plan.manifest.totals.allocated, "calib_batches": spec.n_calib,
        "step_size": plan.manifest.step_size,
    })


METHODS: dict[str, Callable[..., Setup]] = {
    "full": setup_full,
    "lora": setup_lora,
    "rslora": setup_rslora,
    "loraplus": setup_loraplus,
    "pissa": setup_pissa,
    "loraga": setup_loraga,
    "gora": setup_gora,
}
NEEDS_CALIBRATION = ("loraga", "gora")


def prepare(wl: Workload, spec: RunSpec) -> tuple[Setup, float, float]:
    """The seed's model with the method's adapter, and the wall and CPU seconds the method's setup took."""
    torch.manual_seed(spec.seed)
    calib = calibration_batches(wl, spec.seed, spec.n_calib) if spec.method in NEEDS_CALIBRATION else []
    model, _ = wl.load_model(spec.seed)
    t0, cpu0 = time.perf_counter(), time.process_time()
    setup = METHODS[spec.method](model, wl, spec, calib)
    return setup, time.perf_counter() - t0, time.process_time() - cpu0


def adapter_delta_norm(model: nn.Module) -> float | None:
    """Mean over adapted modules of ||s * B @ A||_F / ||W||_F after training (how far the adapter moved W)."""
    ratios = []
    for module in model.modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if lora_a is None or "default" not in lora_a or not hasattr(module, "get_base_layer"):
            continue
        a, b = lora_a["default"].weight, lora_b["default"].weight
        delta = module.scaling["default"] * (b @ a)
        ratios.append((delta.norm() / module.get_base_layer().weight.norm()).item())
    return sum(ratios) / len(ratios) if ratios else None


# ---------------------------------------------------------------------------------------------------- one run
def auto_search(wl: Workload, setup: Setup, seed: int) -> LrSearch:
    """``--lr auto``'s range test exactly as ``gorafit run`` calls it (`search_training_data`: its probe data,
    settled moments and budget), on `wl`'s training rows; the model leaves with its weights unchanged."""
    return search_training_data(setup.model, wl.train_rows, wl.collate, setup.make_optimizer,
                                batch_size=wl.batch_size, train_steps=wl.steps, seed=seed,
                                max_grad_norm=MAX_GRAD_NORM, share=AUTO_SHARE, candidates=AUTO_CANDIDATES)


def train_and_evaluate(wl: Workload, spec: RunSpec, *, log_every: int = 1) -> dict:
    """Train `spec.method` for one epoch of `wl` at `spec.lr` (or the range test's lr) with `spec.seed`."""
    cpu0 = time.process_time()  # CPU seconds: on a shared machine they, not wall seconds, measure cost
    batches = epoch_batches(wl, spec.seed)
    setup, setup_s, setup_cpu_s = prepare(wl, spec)
    model = setup.model
    trainable = sum(p.numel() for p in _trainable(model))

    # ---- lr: the spec's, or the range test's on training batches only
    search, auto_s, auto_cpu_s = None, 0.0, 0.0
    lr = spec.lr
    if spec.auto:
        cpu_auto = time.process_time()
        search = auto_search(wl, setup, spec.seed)
        lr, auto_s, auto_cpu_s = search.chosen, search.seconds, time.process_time() - cpu_auto

    # ---- optimizer: AdamW, cosine decay with 3% warm-up over one epoch
    optimizer = setup.make_optimizer(lr)
    steps = len(batches)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(WARMUP_RATIO * steps), steps)
    params = [p for g in optimizer.param_groups for p in g["params"]]

    # ---- one epoch
    model.train()
    losses: list[float] = []
    t_train, cpu_train = time.perf_counter(), time.process_time()
    for step, batch in enumerate(batches):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps - 1:
            losses.append(round(loss.item(), 5))
    train_s, train_cpu_s = time.perf_counter() - t_train, time.process_time() - cpu_train

    # ---- held-out evaluation
    t_eval = time.perf_counter()
    model.eval()
    with torch.no_grad():
        metrics = wl.evaluate(model)
    eval_s = time.perf_counter() - t_eval
    compression = None
    if spec.compress_to is not None:  # the served adapter: the trained one lowered to compress_to at export
        compressed, compression = compressed_at_export(model, wl, spec.seed, spec.compress_to)
        with torch.no_grad():
            compression["uncompressed"], metrics = metrics, wl.evaluate(compressed)
    return {
        "run_id": spec.run_id,
        "spec": asdict(spec),
        "label": spec.label,
        "workload": wl.name,
        "lr_used": lr,
        **metrics,
        "trainable_params": trainable,
        "steps": steps,
        "train_examples": len(wl.train_rows),
        "batch_size": wl.batch_size,
        "setup_s": round(setup_s, 3),
        "auto_s": round(auto_s, 3),
        "train_s": round(train_s, 3),
        "eval_s": round(eval_s, 3),
        "setup_cpu_s": round(setup_cpu_s, 3),
        "auto_cpu_s": round(auto_cpu_s, 3),
        "train_cpu_s": round(train_cpu_s, 3),
        "cpu_s": round(time.process_time() - cpu0, 3),  # the whole run: setup, auto, training, evaluation
        "auto_share": round(auto_cpu_s / train_cpu_s, 4) if search else None,  # in CPU seconds
        "lr_search": search.to_dict() if search else None,
        "train_loss": losses,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "loss_finite": all(math.isfinite(x) for x in losses),
        "adapter_delta_ratio": adapter_delta_norm(model),
        "method_info": setup.info,
        "compression": compression,
    }


def compressed_at_export(model: nn.Module, wl: Workload, seed: int, rank: int) -> tuple[nn.Module, dict]:
    """The trained adapter as ``gorafit export --format peft --max-rank rank`` writes it, loaded by PEFT onto a
    fresh copy of the base model, and the export's report of what the truncated SVD kept."""
    import tempfile

    from peft import PeftModel

    from gorafit.export import export_peft

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(f"{tmp}/trained")
        result = export_peft(f"{tmp}/trained", f"{tmp}/served", max_rank=rank)
        base, _ = wl.load_model(seed)
        served = PeftModel.from_pretrained(base, f"{tmp}/served", is_trainable=False).eval()
    report = result.compression.to_dict() if result.compression is not None else {"compressed": []}
    return served, {"max_rank": rank, "served_max_rank": max(result.ranks.values()), "report": report}


# ---------------------------------------------------------------------------------------------------- curvature
CURVATURE_BATCHES = 2  # training batches the Hessian is taken on (calibration-sized)
CURVATURE_ITERATIONS = 12


def measure_curvature(wl: Workload, spec: RunSpec) -> dict:
    """lambda_max of the training loss along the method's trainable parameters at its start, each tensor
    scaled by its lr multiplier (at the smallest lr of the lattice, so before any B cap): the curvature
    the optimizer's steps see. On calibration-sized training batches from the end of the seed's order."""
    setup, setup_s, _ = prepare(wl, spec)
    model = setup.model
    order = _order(wl, spec.seed)
    size = wl.calib_batch_size
    batches = _batches(wl, order[-CURVATURE_BATCHES * size:], size)
    groups = setup.multipliers(1e-6)
    params = [p for ps, _ in groups for p in ps]
    mults = [m for ps, m in groups for _ in ps]
    model.eval()  # no dropout: the same function at every Hessian-vector product

    def loss() -> torch.Tensor:
        return sum(model(**b).loss for b in batches) / len(batches)

    t0 = time.perf_counter()
    value, history = hessian_top_eigenvalue(loss, params, multipliers=mults, iterations=CURVATURE_ITERATIONS,
                                            tolerance=1e-2, seed=spec.seed)
    return {"label": spec.label, "seed": spec.seed, "workload": wl.name, "lambda_max": value, "history": history,
            "seconds": round(time.perf_counter() - t0, 2), "setup_s": round(setup_s, 2),
            "batches": CURVATURE_BATCHES, "batch_size": size, "iterations": len(history),
            "multipliers": sorted(set(mults))}
