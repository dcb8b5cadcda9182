"""Paired statistics over held-out problems: every run of a sweep is scored on the same problems, so two
runs are compared problem by problem, not as two independent binomial samples.

- `mcnemar`: the exact McNemar test of one pair of runs (one seed each): under "both runs are equally
  good", the problems exactly one of them solves split 50/50 between them (a binomial test, scipy).
- `paired_interval`: a paired bootstrap 95% interval of the accuracy difference A - B, the problems
  resampled with replacement (scipy.stats.bootstrap), each problem's difference averaged over the seeds
  both losses ran.
- `decide`: a pre-registered claim "A - B < t" or "A - B > t" holds when the whole interval satisfies it,
  fails when the whole interval violates it, and is undecided otherwise (the rule that calls for another
  seed).
"""

from __future__ import annotations

import numpy as np
from scipy import stats

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # fixed: `--report` rebuilds the same intervals, digit for digit, on any machine


def bits_array(bits: str) -> np.ndarray:
    """'0110...' -> a bool array (one element per problem)."""
    if set(bits) - {"0", "1"}:
        raise ValueError(f"per-problem correctness must be a string of 0 and 1, got {bits[:40]!r}")
    return np.frombuffer(bits.encode(), dtype=np.uint8) == ord("1")


def mcnemar(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float]:
    """(problems only A solves, problems only B solves, exact two-sided McNemar p-value)."""
    if a.shape != b.shape:
        raise ValueError(f"mcnemar: runs scored on {a.size} and {b.size} problems")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    if only_a + only_b == 0:
        return 0, 0, 1.0
    return only_a, only_b, float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)


def paired_interval(a_runs: list[np.ndarray], b_runs: list[np.ndarray]) -> tuple[float, float, float]:
    """(mean difference, low, high) of accuracy A - B, as fractions: the seeds' mean per problem, then a
    paired percentile bootstrap over problems."""
    if not a_runs or len(a_runs) != len(b_runs):
        raise ValueError(f"paired_interval: {len(a_runs)} and {len(b_runs)} runs; pair them seed by seed")
    per_problem = np.mean([a.astype(float) - b.astype(float) for a, b in zip(a_runs, b_runs)], axis=0)
    mean = float(per_problem.mean())
    if np.all(per_problem == per_problem[0]):  # no spread to resample (identical runs)
        return mean, mean, mean
    result = stats.bootstrap(
        (per_problem,),
        np.mean,
        n_resamples=BOOTSTRAP_RESAMPLES,
        confidence_level=0.95,
        method="percentile",
        random_state=np.random.default_rng(BOOTSTRAP_SEED),
    )
    return mean, float(result.confidence_interval.low), float(result.confidence_interval.high)


def decide(low: float, high: float, sign: str, threshold: float) -> str:
    """The decision on the claim "A - B `sign` threshold" from the paired interval [low, high]."""
    if sign == "<":
        return "holds" if high < threshold else "fails" if low >= threshold else "undecided"
    if sign == ">":
        return "holds" if low > threshold else "fails" if high <= threshold else "undecided"
    raise ValueError(f"decide: sign must be '<' or '>', got {sign!r}")
