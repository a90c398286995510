"""`--lr auto`'s choice alone, without its training run, for every method and seed of one workload.

A change to the range test's rule changes every `--lr auto` run. Where the new rule chooses the lr that an auto
run already trained at, that run is close to what a new one would be: the search puts the weights back, so the
training that follows is the grid run at that lr and seed. Measured on 2026-12-01: the 27 NLU auto runs made again
with settled moments chose the lr of the old ones and scored the same accuracy to the last digit; the 15 NLU auto
runs whose lr and seed are also a grid cell score that cell's accuracy exactly. NLG is looser: of 10 such pairs, 7
agree within one example of 500 and 4e-5 in completion loss, and 3 trained near the stability edge drift apart
(up to 2.2 points), float rounding amplified by a large step. This script runs the search alone
(`harness.auto_search`, what an auto run does first) and puts its choice and cost beside the auto runs in
`--against`.

Each search is one JSON file under `auto-searches/`, so a rerun resumes; the summary is `auto-searches-WORKLOAD.md`.

    python benchmarks/quality/auto_searches.py --workload nlu --against superseded/auto-fresh-adam [--report-only]
    python benchmarks/quality/auto_searches.py --workload nlg --only 'nlg-full-*' --against runs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.quality import harness  # noqa: E402
from benchmarks.quality.executor import Workloads  # noqa: E402
from benchmarks.quality.grid import MODES, RESULTS, auto_specs  # noqa: E402
from goraplan.files import write_json_atomic, write_text_atomic  # noqa: E402

OUT = RESULTS / "auto-searches"


def search(wl: harness.Workload, spec) -> dict:
    setup, _, _ = harness.prepare(wl, spec)
    cpu0 = time.process_time()
    found = harness.auto_search(wl, setup, spec.seed)
    return {"run_id": spec.run_id, "label": spec.label, "seed": spec.seed,
            "cpu_s": round(time.process_time() - cpu0, 3), "search": found.to_dict()}


def summary(records: list[dict], against: Path) -> str:
    lines = [f"# `--lr auto`'s search alone, against the auto runs in `{against.relative_to(RESULTS)}`", "",
             "Each row: the search as `--lr auto` runs it now (no training run), and the auto run made before. "
             "What the search costs is measured by the auto runs themselves (REPORT.md, 'Cost of auto').", "",
             "| run | chosen now | rule now | steps now | the run's lr | same lr |",
             "|---|---|---|---|---|---|"]
    same = 0
    for r in records:
        s = r["search"]
        path = against / f"{r['run_id']}.json"
        run = json.loads(path.read_text()) if path.is_file() else None
        rule = s["rule"].split(" (")[0].split(":")[0]  # "learning seen", "no learning seen", "too few probe steps"
        run_lr = run["lr_used"] if run else None
        same += run_lr == s["chosen"]
        lines.append(f"| {r['run_id']} | {s['chosen']:.3g} | {rule} | {s['steps_per_candidate']} | "
                     f"{'-' if run_lr is None else f'{run_lr:.3g}'} | {'yes' if run_lr == s['chosen'] else 'no'} |")
    lines += ["", f"{same} of {len(records)} searches chose the lr their auto run trained at.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=["nlu", "nlg"], default="nlu")
    parser.add_argument("--seeds", default=None, help="comma list (default: the full mode's seeds)")
    parser.add_argument("--against", default="superseded/auto-fresh-adam",
                        help="folder of auto run files, relative to the quality results")
    parser.add_argument("--only", default=None, help="comma list of run-id patterns (fnmatch): search only these")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    mode = MODES["full"]
    specs = auto_specs(mode, args.workload, args.seeds, args.only)
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        torch.set_num_threads(1)  # as the grid's workers run
        build = Workloads(mode)
        for spec in specs:
            path = OUT / f"{spec.run_id}.json"
            if not path.exists():
                print(f"[auto-searches] {spec.run_id}", flush=True)
                write_json_atomic(path, search(build(spec.workload), spec), indent=1)
    records = [json.loads((OUT / f"{s.run_id}.json").read_text()) for s in specs if (OUT / f"{s.run_id}.json").exists()]
    text = summary(records, RESULTS / args.against)
    write_text_atomic(RESULTS / f"auto-searches-{args.workload}.md", text)
    print(text)


if __name__ == "__main__":
    main()
