"""Run the results tables on the two local datasets with one command, then write each table and plot.

    python bench/results.py --steps 300000 --only cvl bc td3bc       # results/<dataset>.{md,png} for both datasets
    python bench/results.py --datasets hopper-medium-local --steps 50000
    python bench/results.py --report-only                            # only rebuild tables and plots from runs

Each method is one process of cvl.py (or bench/td3_bc.py for TD3+BC), its seeds in one program via --num-seeds. A run
whose metrics already reach --steps is skipped; a shorter or interrupted one is resumed, so the command can be
stopped and re-run, and later sessions extend the same runs.
"""
from __future__ import annotations

import argparse
import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "d4rl"
# label -> (file, gymnasium eval env, the dataset's own mean return as a normalised score; see shared/d4rl/README.md)
DATASETS = {
    "halfcheetah-medium-local": (SHARED / "halfcheetah_medium-local.hdf5", "HalfCheetah-v4", 41.9),
    "hopper-medium-local": (SHARED / "hopper_medium-local.hdf5", "Hopper-v4", 44.8),
}
LOCAL = list(DATASETS)  # the default tables: the shared datasets
# Datasets made from those by a script, on first use, into results/data/ (not committed): label -> its arguments
MADE = ROOT / "results" / "data"
DATASETS["halfcheetah-mixed-local"] = (MADE / "halfcheetah_mixed-local.hdf5", "HalfCheetah-v4", 21.0)
MAKE = {"halfcheetah-mixed-local": [str(SHARED / "halfcheetah_medium-local.hdf5"), "HalfCheetah-v4",
                                    str(DATASETS["halfcheetah-mixed-local"][0]), "--episodes", "300",
                                    "--random-episodes", "300", "--seed", "0"]}  # bench/mixed_dataset.py
CVL, TD3BC = ROOT / "cvl.py", ROOT / "bench" / "td3_bc.py"
# (method, folder, script, extra flags, seeds). Everything else is cvl.py's cpu preset, or TD3+BC's published settings.
RAW = ["--no-normalize-states"]  # the rows screened before states were standardised by default (2026-12-02)
NCE = ["--critic-loss", "nce"]  # the rows screened before contrastive TD became the default critic (2026-12-03)
METHODS = [
    ("CVL (default: standardised states, contrastive TD critic, AWR plus a push of the policy's mean up dQ/da)",
     "cvl", CVL, [], 3),
    ("CVL, the paper's NCE critic under the default step (the default until 2026-12-03; --critic-loss nce)",
     "cvl-nce", CVL, NCE, 3),
    ("BC (--actor-objective q --bc-coef 1.0)", "bc", CVL, ["--actor-objective", "q", "--bc-coef", "1.0"], 3),
    ("TD3+BC (bench/td3_bc.py)", "td3bc", TD3BC, [], 3),
    ("CVL, the paper's actor and raw states (--critic-loss nce --actor-objective q --no-normalize-states)",
     "cvl-q", CVL, ["--actor-objective", "q", *NCE, *RAW], 3),
    ("CVL, standardised states, AWR on the TD advantage (the default until 2026-12-03; --critic-loss nce "
     "--actor-objective awr)", "cvl-std-awr", CVL, ["--actor-objective", "awr", *NCE], 3),
    ("CVL, standardised states, DDPG+BC (--critic-loss nce --actor-objective ddpg)",
     "cvl-std-ddpg", CVL, ["--actor-objective", "ddpg", *NCE], 3),
    ("CVL, raw states, AWR on the TD advantage (the default until 2026-12-02; --critic-loss nce --actor-objective "
     "awr --no-normalize-states)", "cvl-raw-awr", CVL, ["--actor-objective", "awr", *NCE, *RAW], 3),
    ("BC, raw states (--actor-objective q --bc-coef 1.0 --no-normalize-states)",
     "bc-raw", CVL, ["--actor-objective", "q", "--bc-coef", "1.0", *RAW], 3),
    ("CVL, actions contrasted at the state + DDPG+BC (--critic-loss nce --action-negatives 8 --actor-objective"
     " ddpg)", "cvl-ac8", CVL, ["--action-negatives", "8", "--actor-objective", "ddpg", *NCE], 3),
    ("CVL, DDPG+BC with the Q term scaled by its action gradient (--critic-loss nce --actor-objective ddpg "
     "--ddpg-lambda grad)", "cvl-ddpg-grad", CVL, ["--actor-objective", "ddpg", "--ddpg-lambda", "grad", *NCE], 3),
    ("CVL, DDPG+BC scaled by the action gradient, BC term weighted by AWR (--critic-loss nce --actor-objective"
     " awr-ddpg --ddpg-lambda grad)",
     "cvl-awr-ddpg-grad", CVL, ["--actor-objective", "awr-ddpg", "--ddpg-lambda", "grad", *NCE], 3),
    ("CVL, the same with LayerNorm in phi and psi (--critic-loss nce --actor-objective awr-ddpg --ddpg-lambda "
     "grad --layer-norm)",
     "cvl-awr-ddpg-grad-ln", CVL, ["--actor-objective", "awr-ddpg", "--ddpg-lambda", "grad", "--layer-norm", *NCE], 3),
    ("CVL, AWR on the critic's own advantage Q(s, a) - V(s) (--critic-loss nce --actor-objective awr "
     "--awr-advantage q)", "cvl-awrq", CVL, ["--actor-objective", "awr", "--awr-advantage", "q", *NCE], 3),
    ("CVL, DDPG+BC on the minimum of 2 critics (--critic-loss nce --critics 2 --actor-objective ddpg)",
     "cvl-ddpg-c2", CVL, ["--critics", "2", "--actor-objective", "ddpg", *NCE], 3),
    ("CVL, DDPG+BC on the minimum of 4 critics (--critic-loss nce --critics 4 --actor-objective ddpg)",
     "cvl-ddpg-c4", CVL, ["--critics", "4", "--actor-objective", "ddpg", *NCE], 3),
    ("CVL, contrastive TD with twin critics + DDPG+BC (--critic-loss td --td-weights raw --critics 2 "
     "--actor-objective ddpg)",
     "cvl-td2", CVL, ["--critic-loss", "td", "--td-weights", "raw", "--critics", "2", "--actor-objective", "ddpg"], 3),
    ("CVL, contrastive TD with the original code's raw bootstrap weights under the default step (--td-weights "
     "raw)", "cvl-td", CVL, ["--td-weights", "raw"], 3),
    ("CVL, the default with twice the push (--awr-push 0.1)", "cvl-push0.1", CVL, ["--awr-push", "0.1"], 3),
    # raw states: the screens of 2026-12-01 (docs/experiments.md)
    ("CVL, raw states, AWR beta 1 (--critic-loss nce --actor-objective awr --awr-beta 1.0 "
     "--no-normalize-states)", "cvl-awr-td", CVL, ["--actor-objective", "awr", "--awr-beta", "1.0", *NCE, *RAW], 3),
    ("CVL, raw states, actions contrasted at the state + DDPG+BC (--critic-loss nce --action-negatives 8 "
     "--actor-objective ddpg --no-normalize-states)",
     "cvl-ac8-ddpg", CVL, ["--action-negatives", "8", "--actor-objective", "ddpg", *NCE, *RAW], 3),
    ("CVL, raw states, DDPG+BC (--critic-loss nce --actor-objective ddpg --no-normalize-states)",
     "cvl-ddpg", CVL, ["--actor-objective", "ddpg", *NCE, *RAW], 3),
    ("CVL, raw states, actions contrasted + DDPG+BC + LayerNorm (--critic-loss nce --action-negatives 8 "
     "--actor-objective ddpg --layer-norm --no-normalize-states)",
     "cvl-ac8-ddpg-ln", CVL, ["--action-negatives", "8", "--actor-objective", "ddpg", "--layer-norm", *NCE, *RAW], 3),
    ("CVL, raw states, actions contrasted + AWR on the critic's own advantage (--critic-loss nce "
     "--action-negatives 8 --actor-objective awr --awr-advantage q --no-normalize-states)",
     "cvl-ac8-awrq", CVL,
     ["--action-negatives", "8", "--actor-objective", "awr", "--awr-advantage", "q", *NCE, *RAW], 3),
    ("CVL, raw states, contrastive TD with twin critics + DDPG+BC (--critic-loss td --td-weights raw --critics"
     " 2 --actor-objective ddpg --no-normalize-states)",
     "cvl-td2-ddpg", CVL,
     ["--critic-loss", "td", "--td-weights", "raw", "--critics", "2", "--actor-objective", "ddpg", *RAW], 3),
    ("CVL, raw states, contrastive TD with normalised bootstrap weights, twin critics + DDPG+BC (--critic-loss"
     " td --td-weights normalized --critics 2 --actor-objective ddpg --no-normalize-states)",
     "cvl-td2n-ddpg", CVL,
     ["--critic-loss", "td", "--td-weights", "normalized", "--critics", "2", "--actor-objective", "ddpg", *RAW], 3),
    ("CVL, raw states, AWR on the critic's own advantage (--critic-loss nce --actor-objective awr "
     "--awr-advantage q --awr-beta 1.0 --no-normalize-states)",
     "cvl-awr", CVL, ["--actor-objective", "awr", "--awr-advantage", "q", "--awr-beta", "1.0", *NCE, *RAW], 3),
    ("CVL, the paper's actor with the original code's Q (--critic-loss nce --actor-objective q --q-estimator "
     "diag --goal-reward goal --no-normalize-states)",
     "cvl-diag", CVL, ["--actor-objective", "q", "--q-estimator", "diag", "--goal-reward", "goal", *NCE, *RAW], 1),
    ("CVL, the paper's actor with the paper's batch 1024 (--critic-loss nce --actor-objective q --batch-size "
     "1024 --no-normalize-states)",
     "cvl-batch1024", CVL, ["--actor-objective", "q", "--batch-size", "1024", *NCE, *RAW], 1),
]


def latest_run(folder: Path) -> Path | None:
    runs = sorted(p for p in folder.glob("*/") if (p / "checkpoint.msgpack").exists())
    return runs[-1] if runs else None


def run_step(run: Path) -> int:
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    return int(rows[-1]["step"]) if rows else 0


def run_method(folder: Path, script: Path, flags: list[str], seeds: int, dataset: str, args) -> None:
    run = latest_run(folder)
    if run is not None and run_step(run) >= args.steps:
        print(f"results: {folder}: done ({run_step(run)} steps) in {run}", flush=True)
        return
    if run is not None:  # interrupted or shorter: continue it
        cmd = ["--resume", str(run), "--steps", str(args.steps)]
    else:
        path, eval_env, _ = DATASETS[dataset]
        if not path.exists() and dataset in MAKE:
            import mixed_dataset

            path.parent.mkdir(parents=True, exist_ok=True)
            mixed_dataset.main(MAKE[dataset])
        preset = ["--preset", "cpu"] if script == CVL else []
        cmd = ["--dataset", str(path), "--eval-env", eval_env, *preset, "--steps", str(args.steps),
               "--num-seeds", str(seeds), "--seed", "0", "--out", str(folder), *flags]
    cmd = [sys.executable, str(script), *cmd, *(["--no-progress"] if args.quiet else [])]
    print("results: running", " ".join(cmd), flush=True)
    code = run_to_end(cmd)
    if code != 0:  # stopped (Ctrl-C, SIGTERM: the run saved its last step) or failed (its own error line is above)
        raise SystemExit(f"results: {folder} stopped with exit code {code}; what it saved is kept, and the same "
                         "command resumes it")


def run_to_end(cmd: list[str]) -> int:
    """Run a training process and return its exit code. A SIGINT or SIGTERM sent to this script is passed on to it
    and waited for, so the run saves its last finished step and says how to continue: a Ctrl-C in a terminal
    reaches both processes anyway, but a stop sent to this script alone used to kill the run unsaved (subprocess.run
    kills its child when interrupted) and print a traceback."""
    proc = subprocess.Popen(cmd)
    previous = {sig: signal.signal(sig, lambda signum, _: proc.send_signal(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def summarise(run: Path) -> dict | None:
    """A run's row, or None while it has not reached its first evaluation (no curve to summarise yet)."""
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    evals = [r for r in rows if r.get("score")]
    if not evals:
        return None
    cfg = json.loads((run / "config.json").read_text())
    done = np.diff([0] + [int(r["step"]) for r in rows])  # updates in each row's jitted call
    train_s = float(np.sum(done / np.array([float(r["updates_per_sec"]) for r in rows])))
    return dict(**curve_summary([int(r["step"]) for r in evals], [float(r["score"]) for r in evals],
                                [float(r.get("score_std") or 0.0) for r in evals]),
                steps=int(rows[-1]["step"]), seeds=cfg["num_seeds"], minutes=float(rows[-1]["wall_time"]) / 60,
                train_minutes=train_s / 60, run=run)


def curve_summary(steps, score, std) -> dict:
    """Final, best and 2nd-half mean of a seed-mean curve (evaluation steps, scores, their std over seeds)."""
    steps, score, std = (np.asarray(v, dtype=float) for v in (steps, score, std))
    best = int(np.argmax(score))
    return dict(final=(score[-1], std[-1]), best=(score[best], std[best]), late=score[steps > steps[-1] / 2].mean(),
                curve=(steps, score, std))


CURVE_COLUMNS = ("method", "seeds", "step", "score", "score_std")


def curve_source(r: dict, csv_path: Path) -> str:
    """Where a row's curve came from: "" (a run here), "kept" (the CSV of the table being written) or "committed"
    (another table's CSV, --reference)."""
    if "reference" not in r:
        return ""
    return "kept" if Path(r["reference"]).resolve() == Path(csv_path).resolve() else "committed"


def write_curves(results: dict[str, dict], path: Path) -> None:
    """Each row's seed-mean curve as CSV beside its table, so a later session can draw it (--reference) after the
    run folders are gone (they are not committed)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CURVE_COLUMNS)
        for name, r in results.items():
            if curve_source(r, path) == "committed":  # another table's curve: that table's CSV has it
                continue
            for step, score, std in zip(*r["curve"]):
                w.writerow([name, r["seeds"], int(step), f"{score:.2f}", f"{std:.2f}"])


def read_curves(path: Path) -> dict[str, dict]:
    """The rows of a committed curves CSV (write_curves), summarised like runs; their minutes are unknown. A file
    that is not one raises ValueError naming it."""
    try:
        rows = list(csv.DictReader(open(path)))
        if not rows or set(CURVE_COLUMNS) - set(rows[0]):
            raise ValueError(f"no rows with the columns {', '.join(CURVE_COLUMNS)}")
        out = {}
        for name in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == name]
            out[name] = dict(**curve_summary(*([float(r[k]) for r in mine] for k in ("step", "score", "score_std"))),
                             steps=int(mine[-1]["step"]), seeds=int(mine[-1]["seeds"]), minutes=None,
                             train_minutes=None, reference=path)
        return out
    except (OSError, ValueError, TypeError) as e:  # missing, unreadable, not a curves CSV, a cell not a number
        raise ValueError(f"{path}: {e}") from None


def minutes(m: float | None) -> str:
    return "" if m is None else f"{m:.0f}"


def report(results: dict[str, dict], dataset: str, out: Path, note: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    _, eval_env, dataset_score = DATASETS[dataset]
    lines = [f"# Results on {dataset}", "",
             f"Normalised score (D4RL's reference returns) of the deterministic policy, 10 episodes per "
             f"evaluation in gymnasium {eval_env}, mean +- std over seeds (std 0 for one seed). Final: at the "
             "last step; best: the best evaluation of the seed-mean curve; 2nd-half mean: the mean of the seed-mean "
             "curve over the evaluations in the second half of the run (every 10k steps). Dataset's own mean "
             f"return: {dataset_score}. Train: minutes inside the jitted update calls (all seeds together); "
             "wall-clock: the run's own clock, evaluations included, and on this shared machine also any pause or "
             "other run beside it.", "",
             "| method | steps | seeds | final score | best score | 2nd-half mean | train (min) | wall-clock (min) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    # left: every row; right: the same curves zoomed on the band where CVL and BC differ
    legend_rows = len(results) + 1  # the legend goes under both panels, one line per row and the dataset's mean
    height = 5 + 0.17 * legend_rows
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(13, height), gridspec_kw=dict(width_ratios=(3, 2)))
    for name, r in results.items():
        source = curve_source(r, out.with_suffix(".csv"))
        name = f"{name} ({source} curve)" if source else name
        lines.append(f"| {name} | {r['steps']:,} | {r['seeds']} | {r['final'][0]:.1f} +- {r['final'][1]:.1f} | "
                     f"{r['best'][0]:.1f} +- {r['best'][1]:.1f} | {r['late']:.1f} | {minutes(r['train_minutes'])} | "
                     f"{minutes(r['minutes'])} |")
        x, y, s = r["curve"]
        for a in (ax, zoom):
            label = f"{name} ({r['seeds']} seed{'s' * (r['seeds'] > 1)})"  # name says '(committed curve)' if so
            line, = a.plot(x, y, marker="o", ms=3, ls="--" if "reference" in r else "-", label=label)
            a.fill_between(x, y - s, y + s, alpha=0.2, color=line.get_color())
    for a in (ax, zoom):
        a.axhline(dataset_score, color="gray", ls="--", lw=1, label=f"dataset mean ({dataset_score})")
        a.set_xlabel("gradient step")
        a.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:.0f}k"))
        a.grid(alpha=0.3)
    ax.set_ylabel("normalised score")
    ax.set_title(f"{dataset}, cpu preset")
    start = 40_000  # zoom on the band the seed-mean curves span from here on (on halfcheetah a few points)
    curves = [r["curve"] for r in results.values()]
    late = np.concatenate([y[x >= start] for x, y, _ in curves])
    late = late if late.size else np.concatenate([y for _, y, _ in curves])  # a run shorter than that
    low, high = np.floor(late.min()) - 2, np.ceil(late.max()) + 2
    zoom.set_ylim(low, high)
    zoom.set_xlim(left=start)
    zoom.set_title(f"zoom: score {low:.0f} to {high:.0f}, from step {start // 1000}k")
    fig.legend(*ax.get_legend_handles_labels(), fontsize=7, loc="lower left")  # below the panels, never over a curve
    fig.tight_layout(rect=(0, 0.17 * legend_rows / height, 1, 1))
    fig.savefig(out.with_suffix(".png"), dpi=120)
    write_curves(results, out.with_suffix(".csv"))
    sources = {str(r["reference"]): curve_source(r, out.with_suffix(".csv")) for r in results.values()
               if "reference" in r}
    references = sorted(path for path, source in sources.items() if source == "committed")
    lines += ["", "Each row's steps are in the table. `python bench/results.py --steps N [--only FOLDER ...]` runs the "
              "rows (or extends them to N steps with --resume) and rewrites this file; run folders go to "
              "`results/runs/` and are not committed; each row's curve is in "
              f"`{out.with_suffix('.csv').name}`.",
              *([f"Rows marked '(committed curve)' are drawn from {', '.join(references)} (dashed; their runs are "
                 "not on this machine, so their minutes are unknown)."] if references else []),
              *(["Rows marked '(kept curve)' are this table's earlier rows, kept from its CSV because their runs "
                 "are not on this machine (dashed; minutes unknown)."] if "kept" in sources.values() else []),
              *(["", note] if note else []), "",
              f"![normalised score vs step]({out.with_suffix('.png').name})", ""]
    out.write_text("\n".join(lines))
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300_000, help="gradient steps per run")
    parser.add_argument("--datasets", nargs="+", default=LOCAL, choices=list(DATASETS), help="which tables (default: "
                        "the two shared datasets; halfcheetah-mixed-local, half random episodes, is made on first use "
                        "by bench/mixed_dataset.py)")
    parser.add_argument("--runs", type=Path, default=ROOT / "results" / "runs", help="where run folders go")
    parser.add_argument("--only", nargs="*", default=None, help="folders to run (default: all), e.g. cvl bc td3bc")
    parser.add_argument("--tables", type=Path, default=ROOT / "results", help="where <dataset>.md and .png go "
                        "(e.g. results/screen-100k for a screen, so the main tables keep their rows)")
    parser.add_argument("--report-only", action="store_true", help="do not train; rebuild tables and plots")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--reference", nargs="*", type=Path, default=[], help="committed curves CSVs (the "
                        "<dataset>.csv beside a table) whose rows are drawn beside the runs, dashed, where this "
                        "machine has no run of that row, e.g. --reference results/hopper-medium-local.csv")
    parser.add_argument("--fresh", action="store_true", help="rows only from the runs on this machine; by "
                        "default a table keeps the rows of its existing <dataset>.csv whose runs are not here (run "
                        "folders are not committed, so a later session would otherwise drop them)")
    parser.add_argument("--note", default="", help="a paragraph written under each table, e.g. where the runs "
                        "were trained when not all on this machine")
    args = parser.parse_args()
    references = {}  # dataset -> its committed curves; read (and bad input refused) before hours of training
    for path in args.reference:
        if path.stem not in DATASETS:
            parser.error(f"--reference {path}: the file's name must be a dataset's, one of {', '.join(DATASETS)}")
        try:
            references.setdefault(path.stem, {}).update(read_curves(path))
        except ValueError as e:
            parser.error(f"--reference {e}; give the <dataset>.csv written beside a committed table, e.g. "
                         "results/hopper-medium-local.csv")
    kept = {}  # dataset -> the table's own earlier rows, read before hours of training
    for dataset in [] if args.fresh else args.datasets:
        path = args.tables / f"{dataset}.csv"
        if path.exists():
            try:
                kept[dataset] = read_curves(path)
            except ValueError as e:
                parser.error(f"the table's own curves {e}; mend or remove it, or pass --fresh to rebuild the "
                             "table from the runs here alone")
    order = {name: i for i, (name, *_) in enumerate(METHODS)}  # tables list their rows as METHODS does
    for dataset in args.datasets:
        results = {}
        for name, folder, script, flags, seeds in METHODS:
            where = args.runs / dataset / folder
            if not args.report_only and (args.only is None or folder in args.only):
                run_method(where, script, flags, seeds, dataset, args)
            run = latest_run(where)
            summary = summarise(run) if run is not None else None
            if summary is not None:
                results[name] = summary
        results.update({n: r for n, r in kept.get(dataset, {}).items() if n not in results})
        results.update({n: r for n, r in references.get(dataset, {}).items() if n not in results})
        results = dict(sorted(results.items(), key=lambda item: order.get(item[0], len(order))))
        if results:
            args.tables.mkdir(parents=True, exist_ok=True)
            report(results, dataset, args.tables / f"{dataset}.md", args.note)


if __name__ == "__main__":
    main()
