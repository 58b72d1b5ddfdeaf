"""Training curves from `metrics.jsonl`, one figure for one or several runs, with no server and no extra tool.

    python -m resnext_jax.plot runs/quickstart                       # -> runs/quickstart/training_curves.png
    python -m resnext_jax.plot runs/a runs/b                         # both runs on each panel: ./training_curves.png

Four panels against the optimizer step: train loss, eval top-1, eval loss and the learning rate (the train records'
`learning_rate`). The end-of-run report draws the same figure for its run (report/training_curves.png).
"""

from __future__ import annotations

import argparse
import os
import sys

from resnext_jax.errors import UserError, run_cli

CURVES_PNG = "training_curves.png"
# (panel title, split, metric, y-axis label as a percentage?)
PANELS = (
    ("train loss", "train", "loss", False),
    ("eval top-1", "eval", "top1", True),
    ("eval loss", "eval", "loss", False),
    ("learning rate", "train", "learning_rate", False),
)


def read_run(workdir: str) -> list[dict]:
    """The run's metrics records (`resnext_jax.training.metrics_log.read_metrics`: torn lines skipped)."""
    from resnext_jax.run_files import read_metrics

    if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        raise UserError(f"{workdir} has no metrics.jsonl; pass a workdir of `python -m train` that has logged a step")
    return read_metrics(workdir)


def series(records: list[dict], split: str, metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `metric` in the `split` records, in step order."""
    points = sorted((r["step"], r[metric]) for r in records if r.get("split") == split and metric in r)
    return [step for step, _ in points], [value for _, value in points]


def plot_curves(runs: dict[str, list[dict]], path: str) -> str:
    """Draws the four panels for `runs` ({label: records}) into the PNG `path`; returns `path`."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    figure, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    for axis, (title, split, metric, percent) in zip(axes.flat, PANELS):
        drawn = False
        for label, records in runs.items():
            steps, values = series(records, split, metric)
            if steps:
                axis.plot(steps, values, marker="o" if split == "eval" else None, markersize=3, label=label)
                drawn = True
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if percent:
            axis.yaxis.set_major_formatter(PercentFormatter(1.0))
        if not drawn:
            axis.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axis.transAxes, color="gray")
        elif len(runs) > 1:
            axis.legend(fontsize=8)
    figure.suptitle(", ".join(runs) if len(runs) > 1 else f"training curves: {next(iter(runs))}")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _labels(workdirs: list[str]) -> list[str]:
    """Short distinct labels: the workdirs' base names, or their full paths when two share a name."""
    names = [os.path.basename(os.path.normpath(w)) or w for w in workdirs]
    return names if len(set(names)) == len(names) else [os.path.normpath(w) for w in workdirs]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resnext_jax.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+", help="training workdirs (each holds metrics.jsonl)")
    parser.add_argument(
        "--out", help=f"the PNG to write (default: WORKDIR/{CURVES_PNG} for one run, ./{CURVES_PNG} for several)"
    )
    parser.add_argument("--verbose", action="store_true", help="tracebacks for errors")
    args = parser.parse_args(argv)
    out = args.out or (os.path.join(args.workdirs[0], CURVES_PNG) if len(args.workdirs) == 1 else CURVES_PNG)
    runs = {label: read_run(workdir) for label, workdir in zip(_labels(args.workdirs), args.workdirs)}
    try:
        plot_curves(runs, out)
    except OSError as error:
        raise UserError(f"cannot write {out} ({error.strerror or error}); pass another --out") from error
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
