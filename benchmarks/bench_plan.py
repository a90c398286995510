"""Planning cost against plain LoRA training, side by side in one run (issue: goraplan stage one).

SmolLM2-135M, q/k/v/o targets, batch 4, length 256, the same real batches for both:
``build_plan`` with N gradient steps against N steps of PEFT LoRA (r=8) training with AdamW.
Targets: time ratio <= 1.10; peak memory <= LoRA's peak + the float32 size of the target weights.
Each measurement runs in its own process; the methods alternate and each one's best (least disturbed)
repeat is compared, because this machine is shared.

    python benchmarks/bench_plan.py [--steps 16] [--repeats 2]
    python benchmarks/bench_plan.py --step-size auto   # -> results/plan-auto.*: + the held-out gamma search
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


HELD_OUT_STEPS = 4  # goraplan's default K for --step-size auto


def measure(method: str, steps: int, batch_size: int, length: int, step_size: str = "0.05") -> dict:
    import torch
    from common import packed_batches, peak_rss_mb

    from goraplan import PlanSettings, build_plan
    from goraplan.models import load_model
    from goraplan.targets import find_target_modules

    model, tok = load_model("smollm2-135m")
    auto = method == "gora" and step_size == "auto"
    batches = packed_batches(tok, "sarcasm-lm", steps + (HELD_OUT_STEPS if auto else 0), batch_size, length)
    target_bytes = sum(m.weight.numel() * 4 for m in find_target_modules(model, TARGETS).values())
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    split = {}
    if method == "gora":
        settings = PlanSettings(steps=steps, batch_size=batch_size, target_modules=TARGETS, held_out_steps=HELD_OUT_STEPS,
                                step_size="auto" if auto else float(step_size))
        plan = build_plan(model, batches, settings)
        split = {k: v for k, v in plan.stats.items() if k.endswith("_s")}
    else:
        from peft import LoraConfig, get_peft_model

        model.train()
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
        for b in batches:
            peft_model(**b).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    return {"method": method, "seconds": seconds, "peak_rss_mb": peak_rss_mb(), "rss_after_load_mb": rss_before,
            "target_weights_fp32_mb": target_bytes / 2**20, "split": split}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--step-size", default="0.05", help="GoRA's gamma, or auto (results go to plan-auto.*)")
    p.add_argument("--one", choices=["gora", "lora"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.steps, args.batch_size, args.length, args.step_size)))
        return
    name = "plan-auto" if args.step_size == "auto" else "plan"

    from common import RESULTS, run_json, stamp

    runs = []
    for r in range(args.repeats):
        for method in ("lora", "gora") if r % 2 == 0 else ("gora", "lora"):
            res = run_json([__file__, "--one", method, "--steps", str(args.steps), "--batch-size",
                            str(args.batch_size), "--length", str(args.length), "--step-size", args.step_size])
            print(f"repeat {r} {method}: {res['seconds']:.1f} s, peak {res['peak_rss_mb']:.0f} MiB", flush=True)
            runs.append(res)
    best = {m: min((x for x in runs if x["method"] == m), key=lambda x: x["seconds"]) for m in ("gora", "lora")}
    peak = {m: max(x["peak_rss_mb"] for x in runs if x["method"] == m) for m in ("gora", "lora")}
    limit = peak["lora"] + best["gora"]["target_weights_fp32_mb"]
    summary = {
        "time_ratio": best["gora"]["seconds"] / best["lora"]["seconds"],
        "time_target": 1.10,
        "gora_seconds": best["gora"]["seconds"],
        "lora_seconds": best["lora"]["seconds"],
        "gora_peak_rss_mb": peak["gora"],
        "lora_peak_rss_mb": peak["lora"],
        "memory_limit_mb": limit,
        "memory_ok": peak["gora"] <= limit,
        "gora_split_s": best["gora"]["split"],
    }
    out = {**stamp(sys.argv), "settings": vars(args), "summary": summary, "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2))
    split = summary["gora_split_s"]
    md = [
        "# Planning cost: build_plan vs plain LoRA training (SmolLM2-135M, q/k/v/o)"
        + (f", --step-size auto (K = {HELD_OUT_STEPS} held-out batches)" if args.step_size == "auto" else ""),
        "",
        f"{out['date']} · `{out['command']}` · {out['machine']} · torch {out['versions']['torch']}, "
        f"transformers {out['versions']['transformers']}, peft {out['versions']['peft']}",
        "",
        f"{args.steps} steps, batch {args.batch_size}, length {args.length}, best of {args.repeats} alternating repeats.",
        "",
        "| | GoRA build_plan | PEFT LoRA r=8 + AdamW | ratio | target |",
        "|---|---|---|---|---|",
        f"| time (s) | {summary['gora_seconds']:.2f} | {summary['lora_seconds']:.2f} | {summary['time_ratio']:.3f} | <= 1.10 |",
        f"| peak RSS (MiB) | {peak['gora']:.0f} | {peak['lora']:.0f} | {peak['gora'] / peak['lora']:.3f} | "
        f"<= {limit:.0f} (LoRA + fp32 targets {best['gora']['target_weights_fp32_mb']:.1f}) |",
        "",
        "GoRA time split (s): " + ", ".join(f"{k.removesuffix('_s')} {v:.3f}" for k, v in split.items()),
    ]
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
