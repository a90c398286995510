"""Runs what grid.py plans: one JSON file per run, resumable, shardable between one-thread workers.

A run file lands in ``<results>/runs/<run-id>.json`` only once the run is complete (atomic write), and
counts as done only for the same workload sizes; a rerun skips every done run, so the grid continues
where a killed worker stopped. ``--shard I/N`` workers split the runs by a hash of their id. A run
that raises is recorded in ``failures.jsonl`` and skipped until ``--retry-failed``.
"""

from __future__ import annotations

import fnmatch
import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import stamp
from benchmarks.quality import harness, workloads
from benchmarks.quality.grid import Mode, RunSpec, curvature_specs, in_shard, lr_key, planned, serving_planned
from goraplan.files import write_json_atomic


def workload_config(mode: Mode, workload: str) -> dict | None:
    """The sizes a workload was built with: a run file counts as done only for the same sizes."""
    if mode.builders is not None:
        return None
    return {"nlu": mode.nlu, "nlg": mode.nlg}.get(workload)


def load_records(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / "runs").glob("*.json"))]


def done_records(mode: Mode) -> list[dict]:
    """The run files of this mode's workload sizes."""
    return [r for r in load_records(mode.results) if r.get("workload_config") == workload_config(mode, r["workload"])]


def curvature_path(mode: Mode, spec: RunSpec) -> Path:
    return mode.results / "curvature" / f"{spec.workload}-{spec.label}-s{spec.seed}.json"


class Workloads:
    """Builds a workload on first use and keeps one model family in memory at a time."""

    def __init__(self, mode: Mode):
        self.mode, self.built = mode, {}

    def __call__(self, name: str) -> harness.Workload:
        if name not in self.built:
            self.built.clear()
            if self.mode.builders is not None:
                self.built[name] = self.mode.builders[name]()
            else:
                build = {"nlu": workloads.build_nlu, "nlg": workloads.build_nlg}[name]
                self.built[name] = build(**getattr(self.mode, name))
        return self.built[name]


def todo(mode: Mode, shard: tuple[int, int] = (0, 1), parts: set[str] = frozenset({"auto", "grid"}),
         max_seeds: int | None = None, workloads: set[str] | None = None,
         only: list[str] | None = None) -> list[tuple[str, RunSpec]]:
    """The planned runs of this shard that have no run file and no recorded failure, in run order; `only`:
    run-id patterns (fnmatch) to keep."""
    have = {r["run_id"] for r in done_records(mode)}
    skip = have | _failures(mode.results)
    out = []
    for part, s in planned(mode) + serving_planned(mode, serving_first_seed_best(mode, done_records(mode))):
        if (part in parts and s.run_id not in skip and in_shard(s.run_id, shard)
                and (max_seeds is None or s.seed < max_seeds) and (workloads is None or s.workload in workloads)
                and (only is None or any(fnmatch.fnmatchcase(s.run_id, p) for p in only))):
            out.append((part, s))
            skip.add(s.run_id)  # a serving arm that is also a grid cell runs once
    return out


def serving_first_seed_best(mode: Mode, records: list[dict]) -> dict[str, float]:
    """Each NLU serving arm's best lr on the first seed, once every lr of its window has run there."""
    if not mode.nlu_seeds:
        return {}
    seed = mode.nlu_seeds[0]
    score = {(r["label"], lr_key(r["spec"]["lr"])): r["accuracy"] for r in records
             if r["workload"] == "nlu" and r["spec"]["seed"] == seed}
    best = {}
    for m in mode.serving_nlu:
        values = [(score.get((m.key, lr_key(lr))), lr) for lr in m.lrs]
        if all(v is not None for v, _ in values):
            best[m.key] = max(values, key=lambda x: (x[0], -x[1]))[1]  # the lower lr on a tie
    return best


def run_grid(mode: Mode, command: list[str], *, max_minutes: float | None = None, shard: tuple[int, int] = (0, 1),
             parts: set[str] = frozenset({"auto", "grid", "curvature"}), threads: int = 1,
             max_seeds: int | None = None, workloads: set[str] | None = None, only: list[str] | None = None,
             say: Callable[[str], None] = print) -> dict:
    """Run every missing run of this shard; return counts."""
    import torch

    # One thread per worker: on a shared 2-core machine a second OpenMP thread spin-waits on a busy core.
    torch.set_num_threads(threads)
    harness.PLAN_CACHE = mode.results / "cache" / "plans"
    started = time.time()
    workload = Workloads(mode)
    done = failed = 0

    def out_of_time() -> bool:
        return max_minutes is not None and time.time() - started > 60 * max_minutes

    while True:
        left = todo(mode, shard, parts, max_seeds, workloads, only)
        if not left or out_of_time():
            if left:
                say(f"[quality] --max-minutes {max_minutes:g} reached; {len(left)} runs left for a rerun")
            break
        part, spec = left[0]
        say(f"[quality] {part}: {spec.run_id} ({len(left)} left in this shard)")
        wl = workload(spec.workload)
        try:
            record = harness.train_and_evaluate(wl, spec)
        except Exception as exc:  # keep the grid going; the failure is recorded and reported
            failed += 1
            _record_failure(mode.results, spec, exc, say)
            continue
        record.update(part=part, mode=mode.name, workload_description=wl.description, workload_extra=wl.extra,
                      workload_config=workload_config(mode, spec.workload), stamp=stamp(command))
        write_json_atomic(mode.results / "runs" / f"{spec.run_id}.json", record, indent=1)
        done += 1
        say(f"[quality]   acc {record['accuracy']:.4f}  loss {record['eval_loss']:.4f}  lr {record['lr_used']:.3g}  "
            f"collapsed={record['collapsed']}  train {record['train_s']:.0f}s  auto {record['auto_s']:.0f}s  "
            f"setup {record['setup_s']:.0f}s  eval {record['eval_s']:.0f}s  CPU {record['cpu_s']:.0f}s")
    # curvature after the runs: the runs answer the main question, the curvature explains it
    if "curvature" in parts:
        for spec in curvature_specs(mode):
            path = curvature_path(mode, spec)
            if (path.is_file() or not in_shard(path.stem, shard) or (max_seeds is not None and spec.seed >= max_seeds)
                    or (workloads is not None and spec.workload not in workloads)
                    or (only is not None and not any(fnmatch.fnmatchcase(path.stem, p) for p in only))):
                continue
            if out_of_time():
                break
            say(f"[quality] curvature: {path.stem}")
            try:
                record = harness.measure_curvature(workload(spec.workload), spec)
            except Exception as exc:
                say(f"[quality]   curvature FAILED {path.stem}: {type(exc).__name__}: {exc}")
                continue
            record.update(workload_config=workload_config(mode, spec.workload), stamp=stamp(command))
            write_json_atomic(path, record, indent=1)
    say(f"[quality] {done} runs done, {failed} failed in {(time.time() - started) / 60:.1f} min")
    return {"done": done, "failed": failed}


def _failures(results: Path) -> set[str]:
    path = results / "failures.jsonl"
    if not path.is_file():
        return set()
    return {json.loads(line)["run_id"] for line in path.read_text().splitlines() if line.strip()}


def _record_failure(results: Path, spec: RunSpec, exc: Exception, say: Callable[[str], None]) -> None:
    say(f"[quality]   FAILED {spec.run_id}: {type(exc).__name__}: {exc}")
    results.mkdir(parents=True, exist_ok=True)
    with (results / "failures.jsonl").open("a") as f:
        f.write(json.dumps({"run_id": spec.run_id, "error": f"{type(exc).__name__}: {exc}",
                            "traceback": traceback.format_exc()[-2000:]}) + "\n")
