"""The pre-registered analysis of the sweep (docs/results/PREREGISTRATION.md), applied to every cell
(warm start, split, lr, weight decay, updates) whose runs saved per-problem correctness:

- the cell's final update N, from the run-length rule on its on_policy seed-0 curve (`cell_length`);
- per loss and s: held-out accuracy at N (the evaluation during training at update N, all held-out
  problems) and at the last update, masked and clipped token fractions over updates 1..N and over its
  steady phase (s, N];
- each claim of CLAIMS as a paired difference over problems (paired.py) with its decision, beside the
  per-seed differences (the spread over seeds) and each seed's exact McNemar test;
- the token claim (M2PO's masked fraction at most MASK_RATIO of GRPO's clipped), whole run and steady;
- prosperity before collapse: each run's start, best and last accuracy, and whether it collapsed;
  beside it, not pre-registered, each run's deepest fall (`deepest_fall`), which sees a collapse that
  recovers before the last evaluation.

`write_grid` takes the runs already read (no file access but the table it writes), so the rules are
tested on exact inputs.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import paired

WINDOW = 256  # updates either side of the run-length rule's u
GAIN = 0.01  # the rule's "less than a point"
MIN_LENGTH = 512  # the steady phase at s = 256 at least as long as the warm-start phase
STALENESS = 256  # the claims are decided at this s (other s are tabled, not decided)
# (A, B, sign, threshold, claim): the claim "A - B sign threshold" on held-out accuracy at N
CLAIMS = (
    ("on_policy", "m2po", "<", 0.02, "M2PO within 2 points of on-policy"),
    ("on_policy", "grpo", ">", 0.0, "GRPO below on-policy"),
    ("m2po", "grpo", ">", 0.0, "M2PO above GRPO"),
    ("grpo_noclip", "grpo", ">", 0.0, "PPO's clip costs accuracy on stale data (no clip above GRPO)"),
    ("m2po", "grpo_noclip", ">", 0.0, "M2PO's mask adds accuracy to plain importance sampling"),
)
MASK_RATIO = 0.1  # "M2PO masks at most a tenth of what GRPO clips"
PROSPERITY = 0.05  # a collapse needs a rise of at least 5 points over the start first ...
COLLAPSE = 0.10  # ... and then a fall of at least 10 points from the best to the last evaluation
COLLAPSE_LR = 1e-4  # the collapse claim is decided in the cells at this lr and above


def deepest_fall(evals: list[tuple[int, float]]) -> tuple[float, int | None, int | None]:
    """(fall, from, to): the largest drop in accuracy from an evaluation to any later one, and the two
    updates. Not pre-registered: added (2026-12-07) after the lr 1e-4 seed-0 curves, where
    grpo_noclip fell 37 points mid-run and was back at its best by the last evaluation, so the
    pre-registered rule (best against last) cannot see it."""
    fall, at = 0.0, (None, None)
    best, best_at = -math.inf, None
    for update, acc in sorted(evals):
        if acc > best:
            best, best_at = acc, update
        elif best - acc > fall:
            fall, at = best - acc, (best_at, update)
    return fall, *at


def plateau_length(
    steps: list[int], accuracy: list[float], window: int = WINDOW, gain: float = GAIN
) -> int | None:
    """The run-length rule: the first evaluation update u at which the mean held-out accuracy of the
    evaluations in (u, u + window] is less than `gain` above the mean of those in (u - window, u]; None if
    the curve never flattens (or is too short to tell)."""
    points = list(zip(steps, accuracy))
    for u, _ in points:
        before = [a for x, a in points if u - window < x <= u]
        after = [a for x, a in points if u < x <= u + window]
        if u < window or not after or max(x for x, _ in points) < u + window:
            continue
        if statistics.fmean(after) - statistics.fmean(before) < gain:
            return u
    return None


def cell_length(steps: list[int], accuracy: list[float], cap: int) -> tuple[int, int | None]:
    """(N, plateau u): u rounded up to a multiple of 64, at least MIN_LENGTH, at most the runs' length
    `cap`; N = cap when the curve does not flatten before it."""
    u = plateau_length(steps, accuracy)
    return (cap if u is None else min(cap, max(MIN_LENGTH, -(-u // 64) * 64))), u


def during(correct: dict[str, str]) -> dict[int, str]:
    """The evaluations made during training: update -> bits."""
    return {int(k): v for k, v in correct.items() if k.isdigit()}


def accuracy(bits: str) -> float:
    return bits.count("1") / len(bits)


def mean_upto(curves: list[dict], field: str, first: int, last: int) -> float:
    values = [c[field] for c in curves if field in c and first < c["step"] <= last]
    return statistics.fmean(values) if values else math.nan


def stat(values: list[float], scale: float = 100, digits: int = 1) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    m = statistics.fmean(values) * scale
    spread = f" +- {statistics.stdev(values) * scale:.{digits}f}" if len(values) > 1 else ""
    return f"{m:.{digits}f}{spread}"


def describe(cell: tuple) -> str:
    warm, split, lr, wd, steps = cell
    return f"warm start {warm}, split {split}, lr {lr:g}, weight decay {wd:g}, {steps} updates"


def analyse_cell(runs: list[dict]) -> dict:
    """N and the per-run figures of one cell. Each run: loss, s, seed, steps, curves, correct."""
    cap = max(r["steps"] for r in runs)
    reference = [r for r in runs if r["loss"] == "on_policy" and r["seed"] == 0]
    if reference:
        evals = sorted(during(reference[0]["correct"]).items())
        n, u = cell_length([x for x, _ in evals], [accuracy(b) for _, b in evals], cap)
    else:
        n, u = cap, None
    for r in runs:
        evals = during(r["correct"])
        r["bits_n"] = evals.get(n)
        r["acc_n"] = accuracy(r["bits_n"]) if r["bits_n"] else math.nan
        r["acc_last"] = accuracy(evals[max(evals)]) if evals else math.nan
        r["start"] = accuracy(evals[0]) if 0 in evals else math.nan
        best = max(evals, key=lambda x: (accuracy(evals[x]), -x)) if evals else None
        r["best"], r["best_at"] = (accuracy(evals[best]), best) if best is not None else (math.nan, None)
        s = r["s"]
        for field in ("masked_fraction", "clip_fraction", "m2_before"):
            r[field] = mean_upto(r["curves"], field, 0, n)
            r[field + "_steady"] = mean_upto(r["curves"], field, s, n)
        r["fall"], r["fall_from"], r["fall_to"] = deepest_fall([(x, accuracy(b)) for x, b in evals.items()])
        r["fall_peak"] = accuracy(evals[r["fall_from"]]) if r["fall_from"] is not None else math.nan
        r["collapsed"] = (
            r["best"] - r["start"] >= PROSPERITY and r["best"] - r["acc_last"] >= COLLAPSE
            if not math.isnan(r["best"]) and not math.isnan(r["start"])
            else False
        )
    return {"n": n, "u": u, "cap": cap, "has_reference": bool(reference)}


def claim_rows(runs: list[dict], s: int) -> list[str]:
    lines = []
    for a_loss, b_loss, sign, threshold, claim in CLAIMS:

        def of(loss: str) -> dict[int, dict]:
            at = 0 if loss == "on_policy" else s
            return {r["seed"]: r for r in runs if r["loss"] == loss and r["s"] == at and r["bits_n"]}

        a, b = of(a_loss), of(b_loss)
        seeds = sorted(set(a) & set(b))
        if not seeds:
            continue
        a_bits = [paired.bits_array(a[k]["bits_n"]) for k in seeds]
        b_bits = [paired.bits_array(b[k]["bits_n"]) for k in seeds]
        mean, low, high = paired.paired_interval(a_bits, b_bits)
        per_seed = [a[k]["acc_n"] - b[k]["acc_n"] for k in seeds]
        tests = []
        for k, x, y in zip(seeds, a_bits, b_bits):
            only_a, only_b, p = paired.mcnemar(x, y)
            tests.append(f"seed {k}: {only_a}/{only_b}, p = {p:.2g}")
        lines.append(
            f"| {claim} | {a_loss} - {b_loss} {sign} {100 * threshold:g} | {len(seeds)} | {100 * mean:+.1f} | "
            f"[{100 * low:+.1f}, {100 * high:+.1f}] | {', '.join(f'{100 * d:+.1f}' for d in per_seed)}"
            f"{f' (std {100 * statistics.stdev(per_seed):.1f})' if len(per_seed) > 1 else ''} | "
            f"{'; '.join(tests)} | **{paired.decide(low, high, sign, threshold)}** |"
        )
    return lines


def token_rows(runs: list[dict], s: int) -> list[str]:
    m2po = [r for r in runs if r["loss"] == "m2po" and r["s"] == s]
    grpo = [r for r in runs if r["loss"] == "grpo" and r["s"] == s]
    if not m2po or not grpo:
        return []
    lines = []
    for phase, suffix in (("whole run (1..N)", ""), (f"steady phase ({s}, N]", "_steady")):
        masked = statistics.fmean(r["masked_fraction" + suffix] for r in m2po)
        clipped = statistics.fmean(r["clip_fraction" + suffix] for r in grpo)
        ratio = masked / clipped if clipped > 0 else math.inf
        verdict = "holds" if ratio <= MASK_RATIO else "fails"
        lines.append(
            f"| {phase} | {100 * masked:.3f} ({len(m2po)} seeds) | {100 * clipped:.3f} ({len(grpo)} seeds) "
            f"| 1/{1 / ratio:.1f} | **{verdict}** |"
            if ratio > 0
            else f"| {phase} | 0 | {100 * clipped:.3f} | 0 | **holds** |"
        )
    return lines


def fall_summary(runs: list[dict]) -> str:
    """Per loss, how many runs fell at least COLLAPSE from a point PROSPERITY above their start at any
    later evaluation (a collapse, recovered or not): exploratory, not a pre-registered rule."""
    counts = {}
    for r in sorted(runs, key=lambda r: r["loss"]):
        peak = r["fall_peak"]
        fell = not math.isnan(peak) and peak - r["start"] >= PROSPERITY and r["fall"] >= COLLAPSE
        done, total = counts.get(r["loss"], (0, 0))
        counts[r["loss"]] = (done + fell, total + 1)
    return ", ".join(f"{loss} {done} of {total}" for loss, (done, total) in counts.items())


def collapse_decision(runs: list[dict], lr: float) -> str:
    """The claim "without a trust region training collapses where M2PO does not", at this cell's lr
    (decided at lr >= COLLAPSE_LR, counted at every lr)."""
    noclip = [r["collapsed"] for r in runs if r["loss"] == "grpo_noclip"]
    m2po = [r["collapsed"] for r in runs if r["loss"] == "m2po"]
    if not noclip or not m2po:
        return "not decided here (needs grpo_noclip and m2po)"
    counted = (
        f"grpo_noclip collapses in {sum(noclip)} of {len(noclip)} seeds, m2po in {sum(m2po)} of {len(m2po)}"
    )
    if lr < COLLAPSE_LR:
        return f"{counted} (decided only at lr >= {COLLAPSE_LR:g})"
    if all(noclip) and not any(m2po):
        verdict = "holds"
    elif not any(noclip):
        verdict = "fails"
    else:
        verdict = "mixed"
    return f"{counted}: **{verdict}**"


def table(title: str, header: list[str], rows: list[str]) -> list[str]:
    """A titled markdown table, or nothing when it has no rows."""
    if not rows:
        return []
    return ["", title, "", f"| {' | '.join(header)} |", f"|{' --- |' * len(header)}", *rows]


def write_grid(cells: dict[tuple, list[dict]], path: Path) -> str:
    """grid.md: for each cell, N, the per-loss figures, the paired claims and decisions, the token claim
    and the collapse table."""
    lines = [
        "The pre-registered analysis (PREREGISTRATION.md) of every cell whose runs saved per-problem "
        "correctness, rebuilt by `sweep.py --report`. Accuracies in %, on all held-out problems; A - B in "
        "points; the interval is a paired bootstrap 95% interval over problems of the mean over seeds; "
        "McNemar: problems only A / only B solved, exact two-sided p.",
    ]
    for cell, runs in sorted(cells.items()):
        info = analyse_cell(runs)
        if not info["has_reference"]:
            length = f"no on_policy seed-0 run: N is the runs' length, {info['cap']}"
        elif info["u"] is None:
            length = (
                f"on_policy seed 0 gains at least a point per {WINDOW} updates to the end: N = {info['cap']}"
            )
        else:
            length = f"on_policy seed 0 flattens at update {info['u']}: N = {info['n']}"
        lines += ["", f"## {describe(cell)}", "", f"Final update {length}."]
        groups: dict[tuple, list[dict]] = {}
        for r in sorted(runs, key=lambda r: (r["s"], r["loss"], r["seed"])):
            groups.setdefault((r["loss"], r["s"]), []).append(r)
        rows = []
        for (loss, s), group in groups.items():

            def col(key: str, scale: float = 100, digits: int = 1, group=group) -> str:
                return stat([g[key] for g in group], scale, digits)

            per_seed = ", ".join(f"{100 * g['acc_n']:.1f}" for g in group)
            rows.append(
                f"| {loss} | {s} | {len(group)} | {col('acc_n')} | {per_seed} | {col('acc_last')} | "
                f"{col('masked_fraction', 100, 3)} | {col('masked_fraction_steady', 100, 3)} | "
                f"{col('clip_fraction', 100, 3)} | {col('clip_fraction_steady', 100, 3)} | "
                f"{col('m2_before', 1, 4)} | {col('m2_before_steady', 1, 4)} |"
            )
        lines += table(
            "Per loss (mean +- std over seeds):",
            ["loss", "s", "seeds", "at N", "per seed at N", "at the last update", "masked (%)",
             "masked steady (%)", "clipped (%)", "clipped steady (%)", "M2", "M2 steady"],
            rows,
        )  # fmt: skip
        s = STALENESS
        lines += table(
            f"Claims at s = {s}, at N = {info['n']}:",
            ["claim", "rule", "seeds", "A - B", "paired 95% interval", "per seed", "McNemar", "decision"],
            claim_rows(runs, s),
        )
        lines += table(
            f"M2PO's masked fraction against GRPO's clipped at s = {s} (claim: at most 1/{1 / MASK_RATIO:g}):",
            ["phase", "M2PO masked (%)", "GRPO clipped (%)", "ratio", "decision"],
            token_rows(runs, s),
        )
        ordered = sorted(runs, key=lambda r: (r["s"], r["loss"], r["seed"]))
        lines += table(
            f"Prosperity before collapse (a rise of >= {100 * PROSPERITY:g} points over the start, then a fall "
            f"of >= {100 * COLLAPSE:g} from the best to the last evaluation): {collapse_decision(runs, cell[2])}",
            ["loss", "s", "seed", "start", "best (update)", "last", "collapsed", "deepest fall (updates)"],
            [
                f"| {r['loss']} | {r['s']} | {r['seed']} | {100 * r['start']:.1f} | "
                f"{100 * r['best']:.1f} ({r['best_at']}) | {100 * r['acc_last']:.1f} | "
                f"{'yes' if r['collapsed'] else 'no'} | "
                + (f"{100 * r['fall']:.1f} ({r['fall_from']} -> {r['fall_to']}) |" if r["fall_to"] else "0 |")
                for r in ordered
            ],
        )
        lines += [
            "",
            "Deepest fall (not pre-registered; added 2026-12-07 after the lr 1e-4 seed-0 curves): the largest "
            "drop from an evaluation to a later one, which sees a collapse the run recovers from before its "
            f"last evaluation. Runs that fell >= {100 * COLLAPSE:g} points after rising >= {100 * PROSPERITY:g} "
            f"at any point: {fall_summary(runs)}.",
        ]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text
