"""Training cost of a GoRA adapter against plain LoRA at the same budget, side by side in one run
(issue: gorafit stage two).

SmolLM2-135M, q/k/v/o targets, batch 4, length 128, the same real packed batches for both, both through
the HF Trainer (AdamW, cosine, 3% warmup):
- gorafit: the plan applied (`apply_plan`: per-module ranks, rsLoRA scaling, GoRA init) and the LoRA+
  parameter groups of `GoraTrainer` (every lora_B at 16 x the lr);
- PEFT LoRA at r = r0 (= 8, the plan's budget) with one learning rate.
Targets: time ratio <= 1.05, peak memory ratio <= 1.05. Each measurement runs in its own process (peak
RSS is per method); the methods alternate and each one's best (least disturbed) repeat is compared,
because this machine is shared; each process uses --threads torch threads (default 1: on a shared machine,
more threads than free cores make step times erratic). The first step of each run (warm-up) is not timed.

    python benchmarks/bench_train.py [--steps 20] [--batch-size 4] [--length 128] [--repeats 2] [--threads 1]
                                     [--plan P]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANK, ALPHA, LR, LR_RATIO = 8, 16.0, 1e-4, 16.0


def make_plan(path: str, steps: int, batch_size: int, length: int) -> dict:
    """A GoRA plan for SmolLM2-135M from `steps` real packed batches (in its own process, like the rest)."""
    from common import packed_batches

    from goraplan import PlanSettings, build_plan
    from goraplan.models import load_model

    model, tok = load_model("smollm2-135m")
    batches = packed_batches(tok, "sarcasm-lm", steps, batch_size, length)
    settings = PlanSettings(steps=steps, batch_size=batch_size, max_length=length, rank=RANK, alpha=ALPHA,
                            target_modules=TARGETS)
    t0 = time.perf_counter()
    plan = build_plan(model, batches, settings, model_name="smollm2-135m", data_source="sarcasm-lm", data_split="train")
    plan.save(path)
    ranks = sorted(plan.ranks.values())
    return {"plan": path, "seconds": time.perf_counter() - t0, "ranks_min": ranks[0], "ranks_max": ranks[-1],
            "allocated_params": plan.manifest.totals.allocated, "lora_params": plan.manifest.totals.lora_equivalent}


def describe_plan(path: str) -> dict:
    from goraplan import load_plan

    plan = load_plan(path)
    ranks = sorted(plan.ranks.values())
    manifest = plan.manifest
    return {"plan": path, "sha256": plan.sha256, "ranks_min": ranks[0], "ranks_max": ranks[-1],
            "allocated_params": manifest.totals.allocated, "lora_params": manifest.totals.lora_equivalent,
            "calibration_steps": manifest.calibration.steps, "calibration_source": manifest.calibration.source}


class StepTimer:
    """Wall time of each optimizer step (forward, backward, optimizer, scheduler)."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.started = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.seconds.append(time.perf_counter() - timer.started)

        self.seconds: list[float] = []
        self.started = 0.0
        self.callback = _Callback()


def measure(method: str, plan_path: str, steps: int, batch_size: int, length: int, out_dir: str) -> dict:
    import datasets
    import torch
    from common import packed_batches, peak_rss_mb
    from transformers import Trainer, TrainingArguments, default_data_collator

    from gorafit import GoraTrainer, apply_plan
    from goraplan import load_plan
    from goraplan.models import load_model

    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    model.train()
    batches = packed_batches(tok, "sarcasm-lm", steps, batch_size, length)
    rows = torch.cat([b["input_ids"] for b in batches])
    train_ds = datasets.Dataset.from_dict({"input_ids": rows.tolist(), "attention_mask": torch.ones_like(rows).tolist(),
                                           "labels": rows.tolist()})
    args = TrainingArguments(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=LR,
        lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=5e-4, optim="adamw_torch", seed=0, data_seed=0,
        save_strategy="no", eval_strategy="no", logging_steps=steps, report_to=[], disable_tqdm=True,
        remove_unused_columns=False, dataloader_pin_memory=False,
    )
    timer = StepTimer()
    common = dict(args=args, train_dataset=train_ds, data_collator=default_data_collator, callbacks=[timer.callback])
    if method == "gorafit":
        peft_model = apply_plan(model, load_plan(plan_path))
        trainer = GoraTrainer(model=peft_model, lr_ratio=LR_RATIO, **common)
    else:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
        trainer = Trainer(model=peft_model, **common)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    output = trainer.train()
    total = time.perf_counter() - t0
    timed = timer.seconds[1:]  # the first step warms caches and allocators up
    groups = [(g.get("name", "all"), g["lr"]) for g in trainer.optimizer.param_groups]
    return {
        "method": method,
        "seconds": sum(timed),
        "seconds_per_step": statistics.mean(timed),
        "seconds_per_step_median": statistics.median(timed),
        "train_seconds_total": total,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_training_mb": rss_before,
        "trainable_params": trainable,
        "train_loss": output.training_loss,
        "param_groups": len(groups),
        "lrs": sorted({lr for _, lr in groups}),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per measuring process.")
    p.add_argument("--plan", help="An existing plan for smollm2-135m (q/k/v/o, r0 = 8); default: build one.")
    p.add_argument("--plan-steps", type=int, default=8, help="Gradient steps of the plan built here.")
    p.add_argument("--one", choices=["gorafit", "lora"], help=argparse.SUPPRESS)
    p.add_argument("--make-plan", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.make_plan:
        print(json.dumps(make_plan(args.make_plan, args.plan_steps, args.batch_size, args.length)))
        return
    if args.one:
        print(json.dumps(measure(args.one, args.plan, args.steps, args.batch_size, args.length, args.out_dir)))
        return

    from common import RESULTS, run_json, stamp

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        plan_info = None
        plan_path = args.plan
        if plan_path is None:
            plan_path = str(Path(tmp) / "plan.gora")
            plan_info = run_json([__file__, "--make-plan", plan_path, "--plan-steps", str(args.plan_steps),
                                  "--threads", str(args.threads),
                                  "--batch-size", str(args.batch_size), "--length", str(args.length)])
            print(f"plan: {plan_info['seconds']:.1f} s, ranks {plan_info['ranks_min']}..{plan_info['ranks_max']}",
                  flush=True)
        else:
            plan_info = describe_plan(plan_path)
        runs = []
        for r in range(args.repeats):
            for method in ("lora", "gorafit") if r % 2 == 0 else ("gorafit", "lora"):
                res = run_json([__file__, "--one", method, "--plan", plan_path, "--steps", str(args.steps),
                                "--threads", str(args.threads),
                                "--batch-size", str(args.batch_size), "--length", str(args.length),
                                "--out-dir", str(Path(tmp) / f"{method}-{r}")])
                print(f"repeat {r} {method}: {res['seconds']:.1f} s for {args.steps - 1} steps, "
                      f"peak {res['peak_rss_mb']:.0f} MiB", flush=True)
                runs.append(res)

    methods = ("gorafit", "lora")
    best = {m: min((x for x in runs if x["method"] == m), key=lambda x: x["seconds"]) for m in methods}
    peak = {m: max(x["peak_rss_mb"] for x in runs if x["method"] == m) for m in methods}
    summary = {
        "time_ratio": best["gorafit"]["seconds"] / best["lora"]["seconds"],
        "time_target": 1.05,
        "memory_ratio": peak["gorafit"] / peak["lora"],
        "memory_target": 1.05,
        "gorafit_seconds_per_step": best["gorafit"]["seconds_per_step"],
        "lora_seconds_per_step": best["lora"]["seconds_per_step"],
        "gorafit_peak_rss_mb": peak["gorafit"],
        "lora_peak_rss_mb": peak["lora"],
        "gorafit_trainable_params": best["gorafit"]["trainable_params"],
        "lora_trainable_params": best["lora"]["trainable_params"],
    }
    summary["time_ok"] = summary["time_ratio"] <= summary["time_target"]
    summary["memory_ok"] = summary["memory_ratio"] <= summary["memory_target"]
    out = {**stamp(sys.argv), "settings": vars(args), "plan": plan_info, "summary": summary, "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train.json").write_text(json.dumps(out, indent=2) + "\n")
    s = summary
    md = [
        "# Training cost: gorafit (GoRA plan + LoRA+ groups) vs plain PEFT LoRA r=8 (SmolLM2-135M, q/k/v/o)",
        "",
        f"{out['date']} · `{out['command']}` · {out['machine']} · torch {out['versions']['torch']}, "
        f"transformers {out['versions']['transformers']}, peft {out['versions']['peft']}",
        "",
        f"{args.steps} Trainer steps (first one untimed), batch {args.batch_size}, length {args.length}, the same "
        f"packed sarcasm-lm batches; best of {args.repeats} alternating repeats, each in its own process "
        f"with {args.threads} torch thread(s).",
        "",
        "| | gorafit | PEFT LoRA r=8 | ratio | target |",
        "|---|---|---|---|---|",
        f"| time per step (s) | {s['gorafit_seconds_per_step']:.3f} | {s['lora_seconds_per_step']:.3f} | "
        f"{s['time_ratio']:.3f} | <= 1.05 |",
        f"| peak RSS (MiB) | {s['gorafit_peak_rss_mb']:.0f} | {s['lora_peak_rss_mb']:.0f} | {s['memory_ratio']:.3f} | <= 1.05 |",
        f"| trainable params | {s['gorafit_trainable_params']:,} | {s['lora_trainable_params']:,} | "
        f"{s['gorafit_trainable_params'] / s['lora_trainable_params']:.3f} | |",
        "",
    ]
    if args.plan is None:
        md.append(f"Plan built here from {args.plan_steps} gradient steps in {plan_info['seconds']:.1f} s "
                  f"(not part of the comparison); ranks {plan_info['ranks_min']}..{plan_info['ranks_max']}.")
    else:
        md.append(f"Plan given with --plan ({plan_info['calibration_steps']} gradient steps on "
                  f"{plan_info['calibration_source']}, sha256 {plan_info['sha256'][:12]}); "
                  f"ranks {plan_info['ranks_min']}..{plan_info['ranks_max']}.")
    (RESULTS / "train.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
