"""Every method at its grid-best learning rate and with `--lr auto`, on real models and held-out data.

    python benchmarks/quality/run.py --mode quick                      # under 15 minutes: a taste of each part
    python benchmarks/quality/run.py --mode full                       # the whole grid; resumable, rerun to continue
    python benchmarks/quality/run.py --mode full --shard 0/2 &         # two one-thread workers, one per core
    python benchmarks/quality/run.py --mode full --shard 1/2
    python benchmarks/quality/run.py --mode full --max-minutes 90      # start no new run after 90 minutes
    python benchmarks/quality/run.py --mode full --report-only         # rebuild REPORT.md from the run files

The grid (grid.py) is each method x its lr window x seeds, plus one `--lr auto` run per method and
seed, plus one curvature measurement per method and seed; it runs seed by seed, auto runs first, then
each window from its middle outwards. executor.py runs it, harness.py trains one run, report.py
rebuilds the report from the run files. This file is the command line only: nothing imports it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.common import stamp  # noqa: E402
from benchmarks.quality.grid import MODES  # noqa: E402


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes I/N, e.g. 0/2, not {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text}: I must be in 0 .. N-1")
    return i, n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from the run files")
    parser.add_argument("--max-minutes", type=float, default=None, help="start no new run after this many minutes")
    parser.add_argument("--parts", default="curvature,auto,grid", help="comma list of curvature, auto, grid")
    parser.add_argument("--max-seeds", type=int, default=None,
                        help="run only seeds 0 .. N-1 now (the rest stays planned for a rerun)")
    parser.add_argument("--workloads", default="nlu,nlg", help="comma list of nlu, nlg: run only these now")
    parser.add_argument("--only", default=None,
                        help="comma list of run-id patterns (fnmatch, e.g. 'nlu-*-lrauto-s1'): run only these now")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--shard", type=parse_shard, default=(0, 1),
                        help="I/N: run only this worker's share of the grid (start N workers, one per core)")
    parser.add_argument("--retry-failed", action="store_true", help="forget recorded failures and try them again")
    args = parser.parse_args(argv)
    mode = MODES[args.mode]
    command = ["python", "benchmarks/quality/run.py", *(argv if argv is not None else sys.argv[1:])]
    from benchmarks.quality.executor import run_grid
    from benchmarks.quality.report import write_report

    if args.retry_failed:
        (mode.results / "failures.jsonl").unlink(missing_ok=True)
    if not args.report_only:
        run_grid(mode, command, max_minutes=args.max_minutes, shard=args.shard, parts=set(args.parts.split(",")),
                 threads=args.threads, max_seeds=args.max_seeds, workloads=set(args.workloads.split(",")),
                 only=args.only.split(",") if args.only else None,
                 say=lambda m: print(m, flush=True))
    path = write_report(mode, stamp(command))
    print(f"[quality] report: {path}", flush=True)


if __name__ == "__main__":
    main()
