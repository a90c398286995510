"""Step-size probe: does GoRA's initial adapter lower the loss, and at which gamma? (evidence for a
``--step-size auto``).

GoRA's initial adapter is ``s * B @ A ~ -gamma * G`` with ``B`` linear in gamma, so one plan (built at
gamma 0.05) gives every gamma by scaling ``B``. For each gamma the probe measures, in eval mode (no
dropout), the mean loss on (the first 8 of) the N calibration batches the gradient came from (in-sample) and on K
*held-out* training batches that follow them in the seed's order (what an automatic choice could use
without touching the test split). No training happens here.

Cases: ``nlu`` (MiniLM with its new, random classification head: the gradient flows through a random
head), ``nlu-head-warm`` (the same after training the head alone for one pass over the calibration
examples: a linear probe), ``nlg`` (SmolLM2 with its pretrained LM head).
"""

from __future__ import annotations

import time

import torch

GAMMAS = [0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
PLAN_GAMMA = 0.05
MAX_LOSS_BATCHES = 8  # in-sample loss on the first 8 calibration batches (NLG forward passes are slow here)


@torch.no_grad()
def _mean_loss(model, batches) -> float:
    model.eval()
    return sum(model(**b).loss.item() for b in batches) / len(batches)


def _warm_head(model, batches, lr: float = 1e-3) -> None:
    """A linear probe: the classification head alone, one pass over `batches` with AdamW."""
    for p in model.parameters():
        p.requires_grad_(False)
    head = list(model.classifier.parameters())
    for p in head:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(head, lr=lr)
    model.train()
    for b in batches:
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()


def step_size_probe(wl, case: str, n_calib: int, n_held: int, seed: int = 0, warm_head: bool = False) -> dict:
    """Loss of the GoRA-initialised model against gamma, in-sample and on held-out training batches."""
    from benchmarks.quality.harness import LORA_ALPHA, LORA_RANK, _apply_plan, calibration_batches
    from goraplan import PlanSettings, build_plan

    t0 = time.perf_counter()
    batches = calibration_batches(wl, seed, n_calib + n_held)
    calib, held = batches[:n_calib], batches[n_calib:]
    model, _ = wl.load_model(seed)
    if warm_head:
        _warm_head(model, calib)
    settings = PlanSettings(task=wl.task, target_modules=list(wl.targets), rank=LORA_RANK, alpha=LORA_ALPHA,
                            step_size=PLAN_GAMMA, steps=n_calib, batch_size=wl.calib_batch_size, seed=seed)
    plan = build_plan(model, calib, settings, model_name=wl.name)
    apply_plan, _ = _apply_plan()
    model = apply_plan(model, plan)
    b_params = {n: p for n, p in model.named_parameters() if ".lora_B." in n}
    b0 = {n: p.detach().clone() for n, p in b_params.items()}
    rows = []
    for gamma in GAMMAS:
        with torch.no_grad():
            for n, p in b_params.items():
                p.copy_(b0[n] * (gamma / PLAN_GAMMA))
        rows.append({"gamma": gamma, "calib_loss": _mean_loss(model, calib[:MAX_LOSS_BATCHES]),
                     "held_out_loss": _mean_loss(model, held)})
    best = min(rows, key=lambda r: r["held_out_loss"])
    return {
        "case": case, "workload": wl.name, "workload_description": wl.description, "seed": seed,
        "n_calib": n_calib, "n_held_out": n_held, "calib_batch_size": wl.calib_batch_size,
        "warm_head": warm_head, "rows": rows, "best_gamma_held_out": best["gamma"],
        "held_out_gain_at_best": rows[0]["held_out_loss"] - best["held_out_loss"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
