"""Does GoRA beat LoRA at the same parameter budget? Measured on real pretrained models and real data.

    python benchmarks/quality/run.py --mode quick          # ~10 minutes on 2 cores: a taste of every part
    python benchmarks/quality/run.py --mode full           # the whole grid; resumable, rerun to continue
    python benchmarks/quality/run.py --mode full --report-only
    python benchmarks/quality/run.py --mode full --max-minutes 90   # start no new run after 90 minutes
    python benchmarks/quality/run.py --mode full --shard 0/2 &      # two workers, one per core
    python benchmarks/quality/run.py --mode full --shard 1/2

Every run is one method at one learning rate and one seed, trained by the same loop
(`harness.train_and_evaluate`: AdamW, one epoch, cosine with 3% warm-up, float32, grad-norm clip 1)
on the same batches in the same order. Its record lands in ``<results>/runs/<run-id>.json`` (written
atomically when the run is complete); a rerun skips every run whose file exists. After the runs,
`report.py` rebuilds ``<results>/REPORT.md`` and the PNG charts from whatever run files exist, and
says how much of the planned grid they cover.

Parts (paper tables in brackets):
1. ``nlu`` [Table 1]: MiniLM-L6 on the sarcasm headlines, every method x lr grid x seeds.
2. ``nlg`` [Table 2]: SmolLM2-135M on sarcasm-lm (exact match of the greedy first answer token).
3. ``ablation`` [Tables 3-5]: GoRA's knobs one at a time around a base picked from part 1's results.
4. ``probe``: loss of GoRA's initial adapter against its step size gamma (probe.py), no training.

The grid runs in priority order (two seeds of parts 1-3 first, then the third seed), so a grid cut
short by ``--max-minutes`` still covers every method and learning rate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.common import stamp  # noqa: E402  (command, versions, machine, date: every run file and report)
from benchmarks.quality.harness import RunSpec  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "quality"


# ---------------------------------------------------------------------------------------------------- the grid
# Every method of part 1 as a RunSpec template (lr and seed filled in per point).
NLU_METHODS: list[RunSpec] = [
    RunSpec("nlu", "full", 0, 0),
    RunSpec("nlu", "lora", 0, 0),
    RunSpec("nlu", "rslora", 0, 0),
    RunSpec("nlu", "loraplus", 0, 0),
    RunSpec("nlu", "pissa", 0, 0),
    RunSpec("nlu", "loraga", 0, 0),
    RunSpec("nlu", "adalora", 0, 0),
    RunSpec("nlu", "gora-fixed", 0, 0, ratio=16.0),
    RunSpec("nlu", "gora-fixed", 0, 0, ratio=1.0),
    RunSpec("nlu", "gora", 0, 0, ratio=16.0),
    RunSpec("nlu", "gora", 0, 0, ratio=1.0),
    RunSpec("nlu", "gora", 0, 0, ratio=4.0),  # added after the ablations: the ratio is GoRA's strongest knob
    # the robustness fix (goraplan --step-size auto), on the same grid
    RunSpec("nlu", "gora", 0, 0, ratio=16.0, gamma="auto"),
    RunSpec("nlu", "gora", 0, 0, ratio=1.0, gamma="auto"),
    # gorafit's new default: lora_B's lr capped at 5e-3 (the collapse edge the grid above measured)
    RunSpec("nlu", "gora", 0, 0, ratio=16.0, b_lr_max=5e-3),
    RunSpec("nlu", "gora", 0, 0, ratio=16.0, b_lr_max=3e-3),  # added after 5e-3 collapsed at lr 1e-3 in a seed
]
NLG_METHODS: list[RunSpec] = [
    RunSpec("nlg", "full", 0, 0, group="nlg"),
    RunSpec("nlg", "lora", 0, 0, group="nlg"),
    RunSpec("nlg", "loraplus", 0, 0, group="nlg"),
    # N = 24 batches of 8: the whole 192-example training set once (N = 64 would need 512 examples)
    RunSpec("nlg", "gora", 0, 0, ratio=16.0, n_calib=24, group="nlg"),
    RunSpec("nlg", "gora", 0, 0, ratio=1.0, n_calib=24, group="nlg"),
    # --step-size auto scores gamma on K = 4 batches after the N gradient ones: N = 20 + 4 = the 24 batches
    RunSpec("nlg", "gora", 0, 0, ratio=16.0, n_calib=20, gamma="auto", group="nlg"),
    RunSpec("nlg", "gora", 0, 0, ratio=1.0, n_calib=20, gamma="auto", group="nlg"),
    RunSpec("nlg", "gora", 0, 0, ratio=16.0, n_calib=24, b_lr_max=5e-3, group="nlg"),
    RunSpec("nlg", "gora", 0, 0, ratio=16.0, n_calib=24, b_lr_max=3e-3, group="nlg"),
]
# GoRA's knobs, each varied alone around the ablation base (paper Tables 3-5 and GORA.md's questions).
ABLATIONS: dict[str, list[dict]] = {
    "rank range": [dict(method="gora-fixed"), dict(min_rank=6, max_rank=15), dict()],
    "step size gamma": [dict(gamma=0.0), dict(gamma=0.01), dict(), dict(gamma=0.2)],
    "importance": [dict(), dict(importance="grad-nuclear"), dict(importance="union-nuclear")],
    "calibration batches N": [dict(n_calib=8), dict(n_calib=32), dict()],
    "B/A lr ratio": [dict(ratio=1.0), dict(ratio=4.0), dict(ratio=16.0)],
    "alpha": [dict(alpha=5.66), dict()],
}


@dataclass(frozen=True)
class Mode:
    name: str
    results: Path
    nlu: dict  # build_nlu kwargs
    nlg: dict  # build_nlg kwargs
    lrs: list[float]
    seeds: list[int]
    nlu_methods: list[RunSpec]
    nlg_methods: list[RunSpec]
    nlg_lrs: list[float]
    nlg_seeds: list[int]
    ablation_seeds: list[int]
    ablations: dict[str, list[dict]] = field(default_factory=lambda: ABLATIONS)
    # step-size probes (probe.py): (case, workload, calibration batches N, held-out batches K, warm the head first)
    probes: list[tuple[str, str, int, int, bool]] = field(default_factory=lambda: [
        ("nlu", "nlu", 64, 8, False), ("nlu-head-warm", "nlu", 64, 8, True), ("nlg", "nlg", 16, 8, False)])
    # workload name -> builder; None: workloads.build_nlu / build_nlg with the kwargs above (tests swap in a tiny one)
    builders: dict | None = None
    # The grid runs seed by seed: every part at the first seed, then every part at the next, so a grid
    # cut short still covers every method and learning rate.


MODES = {
    "full": Mode(
        name="full", results=RESULTS,
        nlu=dict(train_examples=1000, test_examples=2000, max_length=64),
        nlg=dict(train_examples=192, test_examples=200, max_length=64),
        # 1e-2 was added after LoRA's best (3e-3) showed up at the edge of the first grid
        lrs=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2], seeds=[0, 1, 2],
        nlu_methods=NLU_METHODS, nlg_methods=NLG_METHODS, nlg_lrs=[1e-4, 3e-4, 1e-3], nlg_seeds=[0, 1],
        ablation_seeds=[0, 1, 2],
    ),
    "quick": Mode(
        name="quick", results=RESULTS / "quick",
        nlu=dict(train_examples=600, test_examples=500, max_length=64),  # >= N * 8 = 512 for GoRA's N = 64
        nlg=dict(train_examples=64, test_examples=60, max_length=64),
        lrs=[1e-4, 1e-3], seeds=[0],
        nlu_methods=[s for s in NLU_METHODS if s.method in ("full", "lora", "loraplus", "gora")
                     and (s.gamma != "auto" or s.ratio == 16.0)],
        nlg_methods=[replace(s, n_calib=8) for s in NLG_METHODS
                     if s.method in ("lora",) or (s.method == "gora" and s.ratio == 1.0 and s.gamma != "auto")],
        nlg_lrs=[1e-3], nlg_seeds=[0], ablation_seeds=[0],
        ablations={"step size gamma": [dict(gamma=0.0), dict()], "B/A lr ratio": [dict(ratio=1.0), dict(ratio=16.0)]},
        probes=[("nlu", "nlu", 16, 4, False), ("nlg", "nlg", 4, 4, False)],
    ),
}
NLU_BASE_FALLBACK = RunSpec("nlu", "gora", 1e-3, 0, ratio=1.0, group="ablation")


def nlu_specs(mode: Mode, seeds: list[int]) -> list[RunSpec]:
    return [replace(t, lr=lr, seed=s) for s in seeds for lr in mode.lrs for t in mode.nlu_methods]


def nlg_specs(mode: Mode, seeds: list[int], records: list[dict]) -> list[RunSpec]:
    """Every NLG method at every lr and seed (plus the untrained model once)."""
    first = mode.nlg_seeds[0] if mode.nlg_seeds else 0
    out = [RunSpec("nlg", "base", 0.0, 0, group="nlg")] if first in seeds else []
    return out + [replace(t, lr=lr, seed=s) for s in seeds for t in mode.nlg_methods for lr in mode.nlg_lrs]


def _ratio_only(spec: RunSpec) -> bool:
    """A part-1 GoRA (4-32) that differs from the defaults in its B/A ratio and N at most (not auto, not capped)."""
    return spec.method == "gora" and replace(spec, ratio=16.0, n_calib=64, lr=0, seed=0, group="main") == RunSpec(
        spec.workload, "gora", 0, 0)


def ablation_base(mode: Mode, records: list[dict]) -> tuple[RunSpec, str]:
    """GoRA (4-32) at the B/A ratio and lr that part 1 found best (mean over seeds), or a fixed fallback.

    Chosen from the common grid's results for GoRA itself, the way a user would pick its settings;
    no other method is tuned beyond the grid.
    """
    from benchmarks.quality.report import mean_std

    cells: dict[tuple[float, float], list[float]] = {}
    for r in records:
        s = RunSpec(**r["spec"])
        if s.workload == "nlu" and s.group == "main" and _ratio_only(s):
            cells.setdefault((s.ratio, s.lr), []).append(r["accuracy"])
    full = {k: v for k, v in cells.items() if v}
    if not full:
        return NLU_BASE_FALLBACK, "fallback (part 1 had no GoRA results yet): ratio 1, lr 1e-3"
    (ratio, lr), accs = max(full.items(), key=lambda kv: mean_std(kv[1])[0])
    why = f"GoRA (4-32)'s best cell of part 1: ratio {ratio:g}, lr {lr:g} ({mean_std(accs)[0]:.4f} over {len(accs)} seeds)"
    template = next(t for t in mode.nlu_methods if _ratio_only(t) and t.ratio == ratio)
    return replace(template, lr=lr, seed=0, group="ablation"), why


def ablation_specs(mode: Mode, base: RunSpec, seeds: list[int]) -> list[tuple[str, RunSpec]]:
    out = []
    for knob, variants in mode.ablations.items():
        for v in variants:
            spec = replace(base, **v)
            # The base itself and GoRA-fixed are runs of part 1 (same spec, same run id): reuse them.
            if spec.method == "gora-fixed" or spec == base or _is_main(mode, spec):
                spec = replace(spec, group="main")
            out += [(knob, replace(spec, seed=s)) for s in seeds]
    return out


def _is_main(mode: Mode, spec: RunSpec) -> bool:
    """True when `spec` differs from a part-1 run only in its group."""
    return any(replace(spec, group="main", lr=0, seed=0) == t for t in mode.nlu_methods)


def planned(mode: Mode, records: list[dict], base: RunSpec) -> list[tuple[str, RunSpec]]:
    """Every run of the grid, in the order it runs: (part, spec), seed by seed."""
    order = []
    for i in range(max(len(mode.seeds), len(mode.nlg_seeds), len(mode.ablation_seeds))):
        order += [("nlu", s) for s in nlu_specs(mode, mode.seeds[i:i + 1])]
        order += [("ablation", s) for _, s in ablation_specs(mode, base, mode.ablation_seeds[i:i + 1])]
        order += [("nlg", s) for s in nlg_specs(mode, mode.nlg_seeds[i:i + 1], records)]
    seen, out = set(), []
    for part, s in order:
        if s.run_id not in seen:
            seen.add(s.run_id)
            out.append((part, s))
    return out


def fixed_ablation_base(mode: Mode, records: list[dict], seeds_needed: int) -> tuple[RunSpec, str] | None:
    """The ablation base, chosen once (when part 1 has `seeds_needed` seeds of GoRA at every lr) and
    kept in ``ablation_base.json`` so that later seeds do not move it. None while it cannot be chosen."""
    path = mode.results / "ablation_base.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        return RunSpec(**saved["spec"]), saved["why"]
    lrs_done = {
        (r["spec"]["ratio"], r["spec"]["lr"]) for r in records
        if r["spec"]["workload"] == "nlu" and r["spec"]["group"] == "main" and _ratio_only(RunSpec(**r["spec"]))
        and r["spec"]["seed"] < seeds_needed
    }
    n_gora = sum(_ratio_only(t) for t in mode.nlu_methods)
    if n_gora == 0 or len(lrs_done) < n_gora * len(mode.lrs):
        return None
    base, why = ablation_base(mode, records)
    mode.results.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"spec": asdict(base), "why": why}, indent=1) + "\n")
    return base, why


# ---------------------------------------------------------------------------------------------------- records
def workload_config(mode: Mode, workload: str) -> dict | None:
    """The sizes a workload was built with: a run file counts as done only for the same sizes."""
    if mode.builders is not None:
        return None
    return {"nlu": mode.nlu, "nlg": mode.nlg}.get(workload)


def load_records(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / "runs").glob("*.json"))]


# ---------------------------------------------------------------------------------------------------- main
def run_grid(mode: Mode, command: list[str], max_minutes: float | None, parts: set[str], threads: int = 1,
             max_seeds: int | None = None, shard: tuple[int, int] = (0, 1)) -> None:
    import torch

    from benchmarks.quality import harness, workloads
    from benchmarks.quality.harness import train_and_evaluate, write_json

    # One thread: on this shared 2-core machine a second OpenMP thread spin-waits on a busy core and
    # made steps 5-6x slower, not faster (measured); one thread also leaves a core to the others.
    torch.set_num_threads(threads)
    runs_dir = mode.results / "runs"
    harness.PLAN_CACHE = mode.results / "cache" / "plans"
    started = time.time()
    built: dict[str, object] = {}

    def workload(name: str):
        if name not in built:
            built.clear()  # one model family in memory at a time
            if mode.builders is not None:
                built[name] = mode.builders[name]()
            else:
                built[name] = workloads.build_nlu(**mode.nlu) if name == "nlu" else workloads.build_nlg(**mode.nlg)
        return built[name]

    done = failed = 0
    while True:  # re-plan after every run: the ablation base follows part 1's results
        records = [r for r in load_records(mode.results) if r.get("workload_config") == workload_config(mode, r["workload"])]
        have = {r["run_id"] for r in records}
        failures = _failures(mode.results)
        chosen = fixed_ablation_base(mode, records, seeds_needed=1)
        base = chosen[0] if chosen else None
        todo = [(p, s) for p, s in planned(mode, records, base or NLU_BASE_FALLBACK)
                if (max_seeds is None or s.seed < max_seeds) and s.run_id not in have and s.run_id not in failures and p in parts
                and (p != "ablation" or base is not None) and in_shard(s.run_id, shard)]
        if not todo:
            break
        if max_minutes is not None and time.time() - started > 60 * max_minutes:
            print(f"[quality] --max-minutes {max_minutes:g} reached; {len(todo)} runs left for a rerun", flush=True)
            break
        part, spec = todo[0]
        print(f"[quality] {part}: {spec.run_id} ({len(todo)} left)", flush=True)
        try:
            record = train_and_evaluate(workload(spec.workload), spec)
        except Exception as exc:  # keep the grid going; the failure is recorded and reported
            failed += 1
            _record_failure(mode.results, spec, exc)
            continue
        wl = workload(spec.workload)
        record.update(part=part, mode=mode.name, workload_description=wl.description, workload_extra=wl.extra,
                      workload_config=workload_config(mode, spec.workload), stamp=stamp(command))
        write_json(runs_dir / f"{spec.run_id}.json", record)
        done += 1
        print(f"[quality]   acc {record['accuracy']:.4f}  collapsed={record['collapsed']}  "
              f"train {record['train_s']:.0f}s  setup {record['setup_s']:.0f}s", flush=True)
    if "probe" in parts:
        from benchmarks.quality.probe import step_size_probe

        for case, name, n_calib, n_held, warm in mode.probes:
            path = mode.results / "probes" / f"{case}.json"
            if path.is_file() and json.loads(path.read_text()).get("workload_config") == workload_config(mode, name):
                continue
            if max_minutes is not None and time.time() - started > 60 * max_minutes:
                break
            print(f"[quality] probe: {case}", flush=True)
            record = step_size_probe(workload(name), case, n_calib, n_held, warm_head=warm)
            record.update(workload_config=workload_config(mode, name), stamp=stamp(command))
            write_json(path, record)
    print(f"[quality] {done} runs done, {failed} failed in {(time.time() - started) / 60:.1f} min", flush=True)


def in_shard(run_id: str, shard: tuple[int, int]) -> bool:
    """Worker `i` of `n` takes the runs whose id hashes to `i`: n workers share a grid without overlap."""
    i, n = shard
    return zlib.crc32(run_id.encode()) % n == i


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes I/N, e.g. 0/2, not {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text}: I must be in 0 .. N-1")
    return i, n


def _failures(results: Path) -> set[str]:
    path = results / "failures.jsonl"
    if not path.is_file():
        return set()
    return {json.loads(line)["run_id"] for line in path.read_text().splitlines() if line.strip()}


def _record_failure(results: Path, spec: RunSpec, exc: Exception) -> None:
    print(f"[quality]   FAILED {spec.run_id}: {type(exc).__name__}: {exc}", flush=True)
    results.mkdir(parents=True, exist_ok=True)
    with (results / "failures.jsonl").open("a") as f:
        f.write(json.dumps({"run_id": spec.run_id, "error": f"{type(exc).__name__}: {exc}",
                            "traceback": traceback.format_exc()[-2000:]}) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from the run files")
    parser.add_argument("--max-minutes", type=float, default=None, help="start no new run after this many minutes")
    parser.add_argument("--parts", default="nlu,nlg,ablation,probe", help="comma list of nlu, nlg, ablation, probe")
    parser.add_argument("--max-seeds", type=int, default=None,
                        help="run only seeds 0 .. N-1 of each part now (the rest stays planned for a rerun)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see run_grid)")
    parser.add_argument("--shard", type=parse_shard, default=(0, 1),
                        help="I/N: run only this worker's share of the grid (start N workers, one per core)")
    parser.add_argument("--retry-failed", action="store_true", help="forget recorded failures and try them again")
    args = parser.parse_args(argv)
    mode = MODES[args.mode]
    command = ["python", "benchmarks/quality/run.py", *(argv if argv is not None else sys.argv[1:])]
    if args.retry_failed:
        (mode.results / "failures.jsonl").unlink(missing_ok=True)
    if not args.report_only:
        run_grid(mode, command, args.max_minutes, set(args.parts.split(",")), args.threads, args.max_seeds, args.shard)
    from benchmarks.quality.report import write_report

    path = write_report(mode, stamp(command))
    print(f"[quality] report: {path}", flush=True)


if __name__ == "__main__":
    main()
