"""Planning with the model sharded by FSDP2: memory per process and time at world sizes 1, 2 and 4, side by
side in one run (issue: plan a model that no single device holds).

SmolLM2-135M in float32, every linear layer but the LM head a target, the same real packed batches for every
world size. World size 1 is the ordinary one-process plan (whole model, whole accumulators); W > 1 loads
the model straight into shards (rank 0 reads the checkpoint) and plans with ``--fsdp``'s code path.

Each process reports its peak resident memory while planning (the high-water mark is reset after loading,
so rank 0's one-off copy of the checkpoint is reported apart) and what it is made of:
- process overhead: resident memory after imports and joining the process group, before the model;
- weights: bytes of the parameters this process holds (its shards);
- accumulators: bytes of its float32 gradient accumulators (its rows of each target);
- other resident memory before planning: the model's Python objects, tokenizer and batches, and what
  loading left behind;
- transient while planning (peak minus resident before planning minus accumulators): activations and
  logits of its batches, FSDP's unsharded layers and the root unit (all-gather and reduce-scatter
  buffers), allocator slack.
glibc keeps freed all-gather buffers unless told to return them, so every process runs with
``MALLOC_MMAP_THRESHOLD_=65536``.

    python benchmarks/bench_shard.py [--steps 8] [--batch-size 2] [--length 128] [--worlds 1,2,4]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MB = 2**20


def status_mb(key: str) -> float:
    """A memory line of /proc/self/status (VmRSS: now, VmHWM: peak since start or the last reset), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def reset_peak() -> None:
    """Start a new high-water mark at the current resident size (Linux: clear_refs 5)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def worker(args: argparse.Namespace) -> None:
    import torch
    from common import packed_batches

    from goraplan import PlanSettings, build_plan, distributed
    from goraplan.models import load_model
    from goraplan.sharded import local
    from goraplan.sharded_load import load_sharded_model
    from goraplan.targets import find_target_modules

    torch.manual_seed(0)
    rank = distributed.init_if_launched()
    world = distributed.world()
    overhead = status_mb("VmRSS")
    reset_peak()
    started = time.perf_counter()
    if world > 1:
        model, tokenizer = load_sharded_model("smollm2-135m", "causal-lm")
    else:
        model, tokenizer = load_model("smollm2-135m", "causal-lm", device="cpu")
    load_seconds = time.perf_counter() - started
    load_peak = status_mb("VmHWM")
    settings = PlanSettings(steps=args.steps, batch_size=args.batch_size, max_length=args.length,
                            target_modules="all-linear", step_size=0.05)
    batches = packed_batches(tokenizer, "sarcasm-lm", args.steps, args.batch_size, args.length)
    modules = find_target_modules(model, "all-linear")
    with torch.no_grad():  # a whole checkpoint may still be memory-mapped: read every weight once, so it is resident
        for p in model.parameters():
            local(p).sum()
    weights = sum(local(p).numel() * local(p).element_size() for p in model.parameters()) / MB
    weights += sum(b.numel() * b.element_size() for b in model.buffers()) / MB
    accumulators = sum(local(m.weight).numel() * 4 for m in modules.values()) / MB
    reset_peak()
    before = status_mb("VmRSS")
    distributed.barrier()
    started = time.perf_counter()
    plan = build_plan(model, batches, settings)
    seconds = time.perf_counter() - started
    peak = status_mb("VmHWM")
    row = {
        "world": world, "rank": rank, "targets": len(modules), "load_s": load_seconds, "plan_s": seconds,
        "gradients_s": plan.stats["gradients_s"], "load_peak_mb": load_peak, "overhead_mb": overhead,
        "rss_before_plan_mb": before, "weights_mb": weights, "accumulators_mb": accumulators, "peak_mb": peak,
        "resident_other_mb": before - overhead - weights,
        "transient_mb": peak - before - accumulators,
        "ranks": plan.ranks if rank == 0 else None,
        "importance": {m.name: m.importance for m in plan.manifest.modules} if rank == 0 else None,
    }
    Path(args.out).with_suffix(f".{rank}.json").write_text(json.dumps(row))
    distributed.finish()


def run_world(world: int, args: argparse.Namespace, scratch: Path) -> list[dict]:
    out = scratch / f"w{world}"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false"}
    worker_args = [__file__, "--worker", "--out", str(out), "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--length", str(args.length)]
    command = [sys.executable, *worker_args] if world == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), *worker_args]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"world size {world} failed:\n{done.stderr[-4000:]}")
    wall = time.perf_counter() - started
    rows = [json.loads(out.with_suffix(f".{r}.json").read_text()) for r in range(world)]
    for row in rows:
        row["wall_s"] = wall
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    one = next(r for r in rows if r["world"] == 1)
    base = one["weights_mb"] + one["accumulators_mb"]
    summary = []
    for world in sorted({r["world"] for r in rows}):
        mine = [r for r in rows if r["world"] == world]
        held = max(r["weights_mb"] + r["accumulators_mb"] for r in mine)
        peak = max(r["peak_mb"] for r in mine)
        summary.append({
            "world": world,
            "weights_mb": max(r["weights_mb"] for r in mine),
            "accumulators_mb": max(r["accumulators_mb"] for r in mine),
            "held_vs_ideal": held / (base / world),
            "overhead_mb": max(r["overhead_mb"] for r in mine),
            "resident_other_mb": max(r["resident_other_mb"] for r in mine),
            "transient_mb": max(r["transient_mb"] for r in mine),
            "peak_mb": peak,
            "peak_vs_one": peak / one["peak_mb"],
            "load_peak_rank0_mb": next(r["load_peak_mb"] for r in mine if r["rank"] == 0),
            "load_peak_other_mb": max((r["load_peak_mb"] for r in mine if r["rank"] != 0), default=None),
            "plan_s": max(r["plan_s"] for r in mine),
            "wall_s": mine[0]["wall_s"],
            "same_ranks_as_one": mine[0]["ranks"] == one["ranks"],
            "importance_max_rel_diff": max(abs(v - one["importance"][k]) / one["importance"][k]
                                           for k, v in mine[0]["importance"].items()),
        })
    return summary


def markdown(summary: list[dict], meta: dict, args: argparse.Namespace) -> str:
    lines = [
        "# Planning sharded with FSDP2: memory per process and time (SmolLM2-135M, all linear layers)",
        "",
        f"{meta['date']}, {meta['machine']}; torch {meta['versions']['torch']}. Command: `{meta['command']}`.",
        f"N = {args.steps} gradient steps, batch {args.batch_size} x {args.length} tokens of sarcasm-lm (packed), "
        f"float32, {args.threads} thread(s) per process, gloo. The machine's 2 cores were shared with other jobs "
        "(run under `nice`): the times are indicative only; the memory figures are not affected.",
        "",
        "Memory in MiB, per process (the largest over the ranks). *held* = weights + accumulators; "
        "*held / ideal* compares it with 1/W of the one-process figure (1.00 is exactly 1/W).",
        "",
        "| W | weights | accumulators | held / ideal | process overhead | other resident before planning "
        "| transient while planning | peak while planning | peak / one process | load peak rank 0 / others | plan s "
        "| same ranks | importance rel diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        other = f"{s['load_peak_other_mb']:.0f}" if s["load_peak_other_mb"] is not None else "-"
        lines.append(
            f"| {s['world']} | {s['weights_mb']:.0f} | {s['accumulators_mb']:.0f} | {s['held_vs_ideal']:.3f} "
            f"| {s['overhead_mb']:.0f} | {s['resident_other_mb']:.0f} | {s['transient_mb']:.0f} | {s['peak_mb']:.0f} "
            f"| {s['peak_vs_one']:.2f} "
            f"| {s['load_peak_rank0_mb']:.0f} / {other} | {s['plan_s']:.1f} | {s['same_ranks_as_one']} "
            f"| {s['importance_max_rel_diff']:.1e} |"
        )
    last, one = summary[-1], summary[0]
    not_shrinking = last["overhead_mb"] + last["resident_other_mb"] + last["transient_mb"]
    lines += [
        "",
        f"Weights + accumulators per process are 1/W of the one-process figure (held / ideal above). The peak is "
        f"not: at W = {last['world']} it is {last['peak_mb']:.0f} MiB against {one['peak_mb'] / last['world']:.0f} "
        f"(1/{last['world']} of the one-process peak), because {not_shrinking:.0f} MiB of it do not shrink with W: "
        f"the process itself ({last['overhead_mb']:.0f}: Python, torch, transformers), the model's Python objects, "
        f"tokenizer and batches ({last['resident_other_mb']:.0f}), and the transient of planning "
        f"({last['transient_mb']:.0f} against {one['transient_mb']:.0f} in one process): every process runs whole "
        "batches (activations and logits), the tied embedding stays whole in FSDP's root unit through forward and "
        "backward, and each block is gathered whole while it runs. For a model of billions of parameters the held "
        f"part dominates and the peak approaches 1/W; here it is "
        f"{(one['weights_mb'] + one['accumulators_mb']) / one['peak_mb']:.0%} of the one-process peak.",
        "",
        f"Loading: rank 0 alone reads the checkpoint, so its peak while loading ({last['load_peak_rank0_mb']:.0f} "
        f"MiB at W = {last['world']}) holds the whole checkpoint once beside its shards; the other ranks' "
        f"({last['load_peak_other_mb']:.0f} MiB) is their process, their shards and the tensors being broadcast.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--render", action="store_true", help="Rewrite shard.md from shard.json (no measuring).")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    import tempfile

    from common import RESULTS, stamp

    from goraplan.files import write_json_atomic, write_text_atomic

    if args.render:
        saved = json.loads((RESULTS / "shard.json").read_text())
        write_text_atomic(RESULTS / "shard.md", markdown(saved["summary"], saved["meta"], args))
        return
    with tempfile.TemporaryDirectory() as scratch:
        rows = [row for world in map(int, args.worlds.split(",")) for row in run_world(world, args, Path(scratch))]
    summary = summarise(rows)
    meta = stamp(["python", "benchmarks/bench_shard.py", *sys.argv[1:]])
    for row in rows:
        row.pop("ranks"), row.pop("importance")
    write_json_atomic(RESULTS / "shard.json", {"meta": meta, "summary": summary, "per_rank": rows})
    write_text_atomic(RESULTS / "shard.md", markdown(summary, meta, args))
    print(markdown(summary, meta, args))


if __name__ == "__main__":
    main()
