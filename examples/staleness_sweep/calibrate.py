"""Calibrate the policy drift before the staleness sweep: which lr keeps M2 <= tau at s = 256?

    python examples/staleness_sweep/calibrate.py --jobs 2                # m2po, s = 256, lr 1e-5 and 2e-5
    python examples/staleness_sweep/calibrate.py --jobs 2 --lower 5e-6   # and a lower lr too
    python examples/staleness_sweep/calibrate.py --report                # tables from the records alone

Runs `m2po` at s = 256 (fixed lag), weight decay 0.01 (the paper's), for every lr in the fixed grid
{1e-5, 2e-5} plus any --lower ones, with the sweep's machinery (sweep.py: same warm start, same records),
each run's record under RESULTS/calibration_runs/<run>/. A run has two phases: the first s updates
train on the warm start's own samples (update u on data u - 1 updates old: `first`); every later batch
is exactly s updates old (`steady`). Per --bin updates of each phase it records the mean staleness, M2
before masking (loss/m2_before: mean (log r)^2 over the trust-region tokens, before the mask), the
masked token fraction, the share of trust-region tokens sampled with p > 0.99 and M2 over the others.

Writes RESULTS/calibration.csv (one row per run, phase and bin) and RESULTS/calibration.md (the per-lr
summary and the chosen lr, then the bins). The selection rule is fixed here, before any run
(`select_lr`): the largest lr whose steady-phase M2 at s = 256, averaged over its updates and seeds, is
<= tau (0.04). If no lr qualifies, none is chosen and the table says so: rerun with a --lower lr.
"""

from __future__ import annotations

import argparse
import csv
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sweep  # noqa: E402  (the sibling script: same warm start, runs and records)

LRS = (1e-5, 2e-5)
FIELDS = [
    "lr",
    "weight_decay",
    "staleness",
    "seed",
    "phase",
    "first_update",
    "last_update",
    "staleness_mean",
    "m2_before",
    "masked_fraction",
    "confident_fraction",
    "m2_before_unconfident",
]


MEANS = ("m2_before", "masked_fraction", "confident_fraction", "m2_before_unconfident")


def mean_of(rows: list[dict], field: str) -> float:
    """Mean of a field over the rows that have it (NaN if none: a run from before it was logged)."""
    values = [r[field] for r in rows if field in r]
    return statistics.fmean(values) if values else float("nan")


def phase_bins(curves: list[dict], s: int, width: int) -> list[dict]:
    """Means of staleness, M2 before masking and masked fraction over `width`-update bins of each phase;
    a phase's bins start at its first update (first: updates 1..s, steady: updates after s)."""
    bins: dict[tuple[str, int], list[dict]] = {}
    for c in curves:
        if "m2_before" not in c:
            continue  # an evaluation-only row (update 0)
        step = int(c["step"])
        phase, offset = ("first", 0) if step <= s else ("steady", s)
        bins.setdefault((phase, (step - offset - 1) // width), []).append(c)
    order = {"first": 0, "steady": 1}
    rows = []
    for (phase, _), group in sorted(bins.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
        rows.append(
            {
                "phase": phase,
                "first_update": int(group[0]["step"]),
                "last_update": int(group[-1]["step"]),
                **{field: mean_of(group, field) for field in (*MEANS, "staleness")},
            }
        )
        rows[-1]["staleness_mean"] = rows[-1].pop("staleness")
    return rows


def select_lr(steady_m2: dict[float, float], tau: float = sweep.TAU) -> float | None:
    """The selection rule, fixed before the runs: the largest lr whose steady-phase M2 is <= tau."""
    ok = [lr for lr, m2 in steady_m2.items() if m2 <= tau]
    return max(ok) if ok else None


def calibration_rows(records: Path, runs: list[dict], width: int) -> list[dict]:
    """The bins of these calibration runs, each with its run's lr, weight decay, s and seed."""
    rows = []
    for run in runs:
        curves = sweep.read_curves(records / run["run"] / "curves.csv")
        for b in phase_bins(curves, int(run["staleness"]), width):
            rows.append({k: run[k] for k in ("lr", "weight_decay", "staleness", "seed")} | b)
    return sorted(rows, key=lambda r: (r["lr"], r["seed"], r["phase"] != "first", r["first_update"]))


def write_calibration(rows: list[dict], steady: dict[float, float], results: Path, tau: float) -> str:
    """calibration.csv (every bin) and calibration.md (per lr, the chosen one, then the bins)."""
    with (results / "calibration.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    chosen = select_lr(steady, tau)

    def phase_mean(lr: float, phase: str, field: str) -> float:
        values = [r[field] for r in rows if r["lr"] == lr and r["phase"] == phase]
        return statistics.fmean(values) if values else float("nan")

    lines = [
        f"Selection rule (fixed before the runs): the largest lr whose steady-phase M2 before masking, "
        f"averaged over the steady updates and seeds, is <= tau = {tau:g}. Chosen: "
        + (
            f"**lr {chosen:g}**."
            if chosen is not None
            else "**none** (every lr is above tau: try a lower one)."
        ),
        "",
        "| lr | M2 first phase | M2 steady phase | masked first (%) | masked steady (%) | <= tau |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for lr in sorted(steady):
        lines.append(
            f"| {lr:g} | {phase_mean(lr, 'first', 'm2_before'):.4f} | {steady[lr]:.4f} | "
            f"{100 * phase_mean(lr, 'first', 'masked_fraction'):.3f} | "
            f"{100 * phase_mean(lr, 'steady', 'masked_fraction'):.3f} | "
            f"{'yes' if steady[lr] <= tau else 'no'} |"
        )
    lines += [
        "",
        "| lr | seed | phase | updates | mean staleness | M2 before masking | masked (%) | T with p > 0.99 (%) "
        "| M2 over T with p <= 0.99 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['lr']:g} | {r['seed']} | {r['phase']} | {r['first_update']}-{r['last_update']} | "
            f"{r['staleness_mean']:.1f} | {r['m2_before']:.4f} | {100 * r['masked_fraction']:.3f} | "
            f"{100 * r['confident_fraction']:.1f} | {r['m2_before_unconfident']:.4f} |"
        )
    text = "\n".join(lines) + "\n"
    (results / "calibration.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sweep.add_run_arguments(parser, steps=512)
    parser.add_argument("--lrs", nargs="+", type=float, default=list(LRS), help="the fixed grid")
    parser.add_argument("--lower", nargs="*", type=float, default=[], help="lower lrs, added to the grid")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--staleness", type=int, default=256)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--tau", type=float, default=sweep.TAU)
    parser.add_argument("--bin", type=int, default=32, help="updates per bin of each phase")
    args = parser.parse_args(argv)
    if args.steps <= args.staleness:
        parser.error(f"--steps {args.steps} leaves no steady phase at s = {args.staleness}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = Path(args.results).resolve()
    records = results / "calibration_runs"
    start = time.perf_counter()
    lrs = sorted({*args.lrs, *args.lower})
    settings = (
        [] if args.report else [("m2po", args.staleness, seed, lr) for lr in lrs for seed in args.seeds]
    )
    failures = sweep.run_all(settings, records, args)
    runs = [  # this calibration's s and weight decay: records of another one are left out
        r
        for r in sweep.load_records(records)
        if int(r["staleness"]) == args.staleness and float(r["weight_decay"]) == args.weight_decay
    ]
    steady: dict[float, list[float]] = {}
    for r in runs:
        steady.setdefault(float(r["lr"]), []).append(float(r["m2_before_steady"]))
    results.mkdir(parents=True, exist_ok=True)
    rows = calibration_rows(records, runs, args.bin)
    print(write_calibration(rows, {lr: statistics.fmean(v) for lr, v in steady.items()}, results, args.tau))
    print(
        f"wrote {len(rows)} bins of {len(runs)} runs to {results / 'calibration.csv'} "
        f"in {time.perf_counter() - start:.0f}s"
    )
    if failures:
        print(f"{len(failures)} of {len(settings)} runs failed; rerun the same command to retry them")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
