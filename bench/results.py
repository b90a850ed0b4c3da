"""Run the results table for halfcheetah-medium-local with one command, then write the table and the plot.

    python bench/results.py                     # every run below, then results/halfcheetah-medium-local.{md,png}
    python bench/results.py --steps 200000      # longer: finished runs are extended with --resume, not redone
    python bench/results.py --report-only       # only rebuild the table and plot from existing runs

Each method is one cvl.py process (its seeds in one program via --num-seeds). A run whose checkpoint already has
--steps steps is skipped; a shorter or interrupted one is resumed, so the command can be stopped and re-run.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATASET = ROOT.parent / "shared" / "d4rl" / "halfcheetah_medium-local.hdf5"
LABEL = "halfcheetah-medium-local"
DATASET_SCORE = 41.9  # the dataset's own mean return (4,926), normalised with D4RL's halfcheetah references
# (method, folder, extra cvl.py flags, seeds). Everything else is the cpu preset.
ORIGINAL_Q = ["--q-estimator", "diag", "--goal-reward", "goal"]  # the original code's Q estimate
METHODS = [
    ("CVL", "cvl", [], 3),
    ("BC (--bc-coef 1.0)", "bc", ["--bc-coef", "1.0"], 3),
    ("CVL, original code's Q (--q-estimator diag --goal-reward goal)", "cvl-diag", ORIGINAL_Q, 3),
    ("CVL, InfoNCE critic (--critic-loss infonce)", "cvl-infonce-normalized", ["--critic-loss", "infonce"], 1),
    ("CVL, no BC term (--bc-coef 0)", "cvl-nobc-normalized", ["--bc-coef", "0"], 1),
    ("CVL, the paper's batch 1024 (--batch-size 1024)", "cvl-batch1024", ["--batch-size", "1024"], 1),
    ("CVL, original code's Q, marginal (--q-estimator marginal --goal-reward goal)", "cvl-marginal",
     ["--q-estimator", "marginal", "--goal-reward", "goal"], 1),
    ("CVL, original code's Q, InfoNCE critic (... --critic-loss infonce)", "cvl-infonce",
     [*ORIGINAL_Q, "--critic-loss", "infonce"], 1),
    ("CVL, original code's Q, no BC term (... --bc-coef 0)", "cvl-nobc", [*ORIGINAL_Q, "--bc-coef", "0"], 1),
    ("CVL, original code's Q, corrected density ratio (... --density-ratio corrected)", "cvl-corrected",
     [*ORIGINAL_Q, "--density-ratio", "corrected"], 3),
]


def latest_run(folder: Path) -> Path | None:
    runs = sorted(p for p in folder.glob("*/") if (p / "checkpoint.msgpack").exists())
    return runs[-1] if runs else None


def run_step(run: Path) -> int:
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    return int(rows[-1]["step"]) if rows else 0


def run_method(folder: Path, flags: list[str], seeds: int, args) -> None:
    run = latest_run(folder)
    if run is not None and run_step(run) >= args.steps:
        print(f"results: {folder.name}: done ({run_step(run)} steps) in {run}", flush=True)
        return
    if run is not None:  # interrupted or shorter: continue it
        cmd = ["--resume", str(run), "--steps", str(args.steps)]
    else:
        cmd = ["--dataset", str(args.dataset), "--eval-env", "HalfCheetah-v4", "--preset", "cpu",
               "--steps", str(args.steps), "--num-seeds", str(seeds), "--seed", "0", "--out", str(folder), *flags]
    cmd = [sys.executable, str(ROOT / "cvl.py"), *cmd, *(["--no-progress"] if args.quiet else [])]
    print("results: running", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def summarise(run: Path) -> dict:
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    evals = [r for r in rows if r.get("score")]
    score = np.array([float(r["score"]) for r in evals])
    steps = np.array([int(r["step"]) for r in evals])
    std = np.array([float(r.get("score_std") or 0.0) for r in evals])
    best = int(np.argmax(score))
    cfg = json.loads((run / "config.json").read_text())
    return dict(steps=int(rows[-1]["step"]), seeds=cfg["num_seeds"], final=(score[-1], std[-1]),
                best=(score[best], std[best]), late=score[steps > steps[-1] / 2].mean(),
                minutes=float(rows[-1]["wall_time"]) / 60, curve=(steps, score, std), run=run)


def report(results: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    lines = [f"# Results on {LABEL}", "",
             "Normalised score (D4RL's halfcheetah reference returns) of the deterministic policy, 10 episodes per "
             "evaluation in gymnasium HalfCheetah-v4, mean +- std over seeds (std 0 for one seed). Final: at the "
             "last step; best: the best evaluation of the seed-mean curve; 2nd-half mean: the mean of the seed-mean "
             "curve over the evaluations in the second half of the run (every 10k steps). Dataset's own mean "
             f"return: {DATASET_SCORE}.", "",
             "| method | steps | seeds | final score | best score | 2nd-half mean | wall-clock (min) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    # left: every row; right: the same curves zoomed on the band where CVL and BC differ
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw=dict(width_ratios=(3, 2)))
    for name, r in results.items():
        lines.append(f"| {name} | {r['steps']:,} | {r['seeds']} | {r['final'][0]:.1f} +- {r['final'][1]:.1f} | "
                     f"{r['best'][0]:.1f} +- {r['best'][1]:.1f} | {r['late']:.1f} | {r['minutes']:.0f} |")
        x, y, s = r["curve"]
        for a in (ax, zoom):
            line, = a.plot(x, y, marker="o", ms=3, label=f"{name} ({r['seeds']} seed{'s' * (r['seeds'] > 1)})")
            a.fill_between(x, y - s, y + s, alpha=0.2, color=line.get_color())
    for a in (ax, zoom):
        a.axhline(DATASET_SCORE, color="gray", ls="--", lw=1, label=f"dataset mean ({DATASET_SCORE})")
        a.set_xlabel("gradient step")
        a.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:.0f}k"))
        a.grid(alpha=0.3)
    ax.set_ylabel("normalised score")
    ax.set_title(f"{LABEL}, cpu preset")
    (low, high), start = (41, 46), 40_000
    zoom.set_ylim(low, high)
    zoom.set_xlim(left=start)
    zoom.set_title(f"zoom: score {low} to {high}, from step {start // 1000}k")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    lines += ["", "Each row's steps are in the table. `python bench/results.py --steps N [--only FOLDER ...]` runs the "
              "rows (or extends them to N steps with --resume) and rewrites this file; run folders go to "
              "`results/runs/` and are not committed.", "",
              f"![normalised score vs step]({out.with_suffix('.png').name})", ""]
    out.write_text("\n".join(lines))
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200_000, help="gradient steps per run")
    parser.add_argument("--dataset", type=Path, default=DATASET, help="the halfcheetah-medium-local file")
    parser.add_argument("--runs", type=Path, default=ROOT / "results" / "runs", help="where run folders go")
    parser.add_argument("--only", nargs="*", default=None, help="folders to run (default: all), e.g. cvl bc")
    parser.add_argument("--report-only", action="store_true", help="do not train; rebuild table and plot")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    results = {}
    for name, folder, flags, seeds in METHODS:
        if not args.report_only and (args.only is None or folder in args.only):
            run_method(args.runs / folder, flags, seeds, args)
        run = latest_run(args.runs / folder)
        if run is not None:
            results[name] = summarise(run)
    if results:
        report(results, ROOT / "results" / f"{LABEL}.md")


if __name__ == "__main__":
    main()
