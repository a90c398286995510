"""The statistics of the quality report: pure functions on lists of run records.

Mean and sample standard deviation over seeds; a margin between two methods is the difference of their
means ± its standard error ``sqrt(s1^2/n1 + s2^2/n2)`` (0 when each has one seed). A method's best lr
is the grid lr with the best mean score over the seeds done (the lower lr on a tie).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

from benchmarks.quality.grid import AUTO, lr_key
from goraplan.report import rank_correlation


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value).

    >>> mean_std([0.5, 0.7])
    (0.6, 0.14142135623730948)
    """
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def margin(a: list[float], b: list[float]) -> tuple[float, float]:
    """Difference of means and its standard error.

    >>> margin([0.8, 0.8], [0.7, 0.7])
    (0.10000000000000009, 0.0)
    """
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    return ma - mb, math.sqrt(sa**2 / len(a) + sb**2 / len(b))


def spearman(x: list[float], y: list[float]) -> float | None:
    """Rank correlation (no ties expected); None for fewer than 3 points.

    >>> spearman([1, 2, 3, 4], [10, 30, 20, 40])
    0.8
    """
    return rank_correlation(x, y) if len(x) >= 3 else None


class Cells:
    """Run records grouped by (label, lr): the lr is a float (3 significant digits) or ``"auto"``."""

    def __init__(self, records: list[dict]):
        self.runs: dict[tuple[str, float | str], list[dict]] = defaultdict(list)
        for r in records:
            self.runs[(r["label"], lr_key(r["spec"]["lr"]))].append(r)

    def labels(self) -> list[str]:
        return sorted({k[0] for k in self.runs})

    def lrs(self, label: str | None = None) -> list[float]:
        return sorted({k[1] for k in self.runs if k[1] != AUTO and (label is None or k[0] == label)})

    def values(self, label: str, lr: float | str, key: str = "accuracy") -> list[float]:
        return [r[key] for r in self.runs.get((label, lr_key(lr)), []) if r.get(key) is not None]

    def records(self, label: str, lr: float | str) -> list[dict]:
        return self.runs.get((label, lr_key(lr)), [])

    def best_lr(self, label: str, key: str = "accuracy", lower_is_better: bool = False) -> float | None:
        """The grid lr with the best mean `key` (the lower lr on a tie), or None without grid runs."""
        options = [(lr, mean_std(self.values(label, lr, key))[0]) for lr in self.lrs(label)
                   if self.values(label, lr, key)]
        if not options:
            return None
        sign = -1 if lower_is_better else 1
        return max(options, key=lambda o: (round(sign * o[1], 6), -o[0]))[0]

    def collapsed(self, label: str, lr: float | str | None = None) -> tuple[int, int]:
        runs = [r for (lab, x), rs in self.runs.items() if lab == label and (lr is None or x == lr_key(lr))
                for r in rs]
        return sum(bool(r["collapsed"]) for r in runs), len(runs)
