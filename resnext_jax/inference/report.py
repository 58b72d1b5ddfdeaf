"""The evaluation report: accuracy, per-class results, speed, memory, the model and its provenance, together.

    report = evaluate_and_report("runs/quickstart", out_dir="runs/quickstart/report")

writes `report.json` (every number; docs/inference.md explains each field), `report.md` (the same for people,
with the confusion matrix embedded) and `confusion_matrix.png` (and `confusion_matrix.csv`). No single number is
enough: accuracy means little without the speed, memory and exact configuration it was measured with.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess

import jax
import numpy as np

from resnext_jax.errors import UserError, disk_error
from resnext_jax.inference import evaluation
from resnext_jax.inference.calibration import RELIABILITY_PNG
from resnext_jax.inference.figures import plot_confusion, plot_reliability
from resnext_jax.inference.from_artifact import runtime_fields
from resnext_jax.inference.loader import LoadedModel, load_model

SCHEMA_VERSION = 1
DEFAULT_BATCH_SIZES = (1, 8, 64)
CONFUSION_PNG, CONFUSION_CSV = "confusion_matrix.png", "confusion_matrix.csv"
CURVES_PNG = "training_curves.png"  # resnext_jax.plot's figure of the run's metrics.jsonl, for a workdir
# Up to this many classes the matrix is also inlined in report.json and drawn with names and counts.
INLINE_CLASSES = 100


def evaluate_and_report(
    source: str | LoadedModel,
    *,
    dataset: str | None = None,
    model: str | None = None,
    which: str | int = "best",
    data_dir: str | None = None,
    batch_size: int | None = None,
    speed_batch_sizes=DEFAULT_BATCH_SIZES,
    min_seconds: float = 2.0,
    out_dir: str | None = None,
) -> dict:
    """Evaluates `source` (anything `load_model` takes, or a LoadedModel) and writes the report to `out_dir`.

    `dataset` is 'NAME' or 'NAME:split' (default: the run's dataset and its eval split). `out_dir` defaults to
    `<workdir>/report` for a workdir. Empty `speed_batch_sizes` skip the speed pass (the report then has no
    'speed' section). Returns the report dict (as written to report.json, without the matrix
    for more than INLINE_CLASSES classes).
    """
    loaded = source if isinstance(source, LoadedModel) else load_model(source, model=model, which=which)
    if dataset is None:
        dataset = (loaded.config or {}).get("dataset")
        if not dataset:
            raise UserError("pass --dataset NAME[:split]: torchvision weights do not say what to evaluate them on")
    if data_dir is None and loaded.config:
        data_dir = loaded.config.get("data_dir") or None
    if out_dir is None:
        if loaded.source["kind"] != "workdir":
            raise UserError("pass --out DIR for the report")
        out_dir = os.path.join(loaded.source["path"], "report")
    name, split = evaluation.parse_dataset(dataset)
    accuracy = evaluation.evaluate_accuracy(loaded, name, split=split, data_dir=data_dir, batch_size=batch_size)
    speed = evaluation.measure_speed(loaded, speed_batch_sizes, min_seconds=min_seconds) if speed_batch_sizes else None
    report = build_report(loaded, accuracy, speed, evaluation.peak_memory())
    report["report_dir"] = os.path.abspath(out_dir)
    run_metrics = os.path.join(loaded.source.get("path") or "", "metrics.jsonl")
    report["training_curves"] = (
        CURVES_PNG if loaded.source["kind"] == "workdir" and os.path.exists(run_metrics) else None
    )
    write_report(out_dir, report, accuracy["confusion"], accuracy["calibration"])
    return report


def write_run_report(workdir: str, **kwargs) -> dict:
    """The end-of-run report of a training workdir, written to `<workdir>/report` (for the training loop)."""
    return evaluate_and_report(workdir, **kwargs)


def model_section(loaded: LoadedModel) -> dict:
    """Params, GFLOPs and the per-stage table of `resnext_jax.summary` at the preset's crop size."""
    from resnext_jax.summary import format_summary, summarize

    summary = summarize(loaded.name, loaded.preprocessing.crop_size, **loaded.model_kwargs)
    return {
        "name": loaded.name,
        "model_kwargs": _plain(loaded.model_kwargs),
        "dtype": str(np.dtype(loaded.module.dtype)),
        "params": summary["params"],
        "gflops": round(summary["gflops"], 4),
        "resolution": summary["resolution"],
        "stem_params": summary["stem_params"],
        "head_params": summary["head_params"],
        "stages": _plain(summary["stages"]),
        "table": format_summary(summary),
    }


def provenance() -> dict:
    """Package versions, Python, platform, devices, the git commit, and the native CPU kernels' state."""
    from resnext_jax import cpu
    from resnext_jax.run_files import package_versions

    versions = package_versions()
    backend = jax.default_backend()
    if backend == "cpu":
        kernels = cpu.report()  # available or why not, the build, and why each kernel unused so far is
    else:  # never build the C++ kernels just to say that a GPU or TPU does not use them
        kernels = {
            "available": None,
            "isa": None,
            "unavailable_reason": f"CPU-only kernels; the backend is {backend}",
            "build": {},
            "used": [],
            "not_used": {},
        }  # cpu.report()'s fields, so every report has them
    return {
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "backend": backend,
        "process_count": jax.process_count(),
        "devices": [str(device) for device in jax.devices()],
        "git": git_commit(),
        "native_kernels": kernels,
    }


def git_commit() -> dict | None:
    """{'commit', 'dirty'} of the checkout resnext_jax runs from, or None (an installed wheel, no git)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def build_report(loaded: LoadedModel, accuracy: dict, speed: dict, memory: dict) -> dict:
    """Assembles report.json's dict from the measurements (see docs/inference.md for every field)."""
    confusion = accuracy["confusion"]
    names = loaded.preprocessing.class_names
    pre = loaded.preprocessing
    prov = provenance()
    speed = dict(speed) if speed is not None else None
    targets = speed.pop("native_kernel_targets") if speed is not None else []
    prov["native_kernels"].update(ran=bool(targets), targets=targets)
    report = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "source": loaded.source,
        "runtime": runtime_fields(loaded),  # what ran it: jax or onnxruntime, its provider, the precision
        "model": model_section(loaded),
        "preprocessing": {
            "resize_size": pre.resize_size,
            "crop_size": pre.crop_size,
            "mean": list(pre.mean),
            "std": list(pre.std),
            "interpolation": pre.interpolation,
        },
        "dataset": {
            "name": accuracy["dataset"],
            "split": accuracy["split"],
            "examples": accuracy["count"],
            "num_classes": len(names),
            "batch_size": accuracy["batch_size"],
            "devices": accuracy["devices"],
        },
        "accuracy": {
            key: accuracy[key] for key in ("top1", "top5", "loss", "count", "correct", "correct_top5", "seconds")
        },
        "per_class": evaluation.per_class(confusion, names),
        "confusion_matrix": {
            "png": CONFUSION_PNG,
            "csv": CONFUSION_CSV,
            "rows": "true class",
            "columns": "predicted class",
            "counts": confusion.tolist() if len(names) <= INLINE_CLASSES else None,
        },
        "calibration": {
            "ece": accuracy["calibration"]["ece"],
            "bin_count": accuracy["calibration"]["bin_count"],
            "bins": accuracy["calibration"]["bins"],
            "png": RELIABILITY_PNG,
        },
        "speed": speed,
        "memory": memory,
        "config": loaded.config or {"model": loaded.name, "weights": loaded.source.get("weights")},
        "provenance": prov,
    }
    if speed is None:  # --speed off: no speed section at all
        del report["speed"]
    return report


def write_report(out_dir: str, report: dict, confusion: np.ndarray, calibration: dict | None = None) -> dict:
    """Writes report.json, report.md, confusion_matrix.png and .csv (and reliability.png given the calibration)
    into `out_dir`; returns their paths."""
    names = ("report.json", "report.md", CONFUSION_PNG, CONFUSION_CSV) + ((RELIABILITY_PNG,) if calibration else ())
    paths = {name: os.path.join(out_dir, name) for name in names}
    try:
        os.makedirs(out_dir, exist_ok=True)
        np.savetxt(paths[CONFUSION_CSV], confusion, fmt="%d", delimiter=",")
        plot_confusion(confusion, report, paths[CONFUSION_PNG])
        if report.get("training_curves"):
            from resnext_jax.plot import plot_curves, read_run

            workdir = report["source"]["path"]
            plot_curves({os.path.basename(workdir): read_run(workdir)}, os.path.join(out_dir, CURVES_PNG))
        if calibration:
            data = report["dataset"]
            title = f"{report['model']['name']} on {data['name']}:{data['split']}"
            plot_reliability(calibration, paths[RELIABILITY_PNG], title)
        with open(paths["report.json"], "w") as f:
            json.dump(report, f, indent=1)
        with open(paths["report.md"], "w") as f:
            f.write(render_markdown(report))
    except OSError as error:
        raise disk_error(error, out_dir, "the evaluation report") from error
    return paths


def _plain(value):
    """JSON-safe copies of tuples and numpy scalars."""
    return json.loads(json.dumps(value, default=lambda item: item.item() if hasattr(item, "item") else str(item)))


def _init_lines(init: dict | None) -> list[str]:
    """report.md's line naming the run or file a training run's first weights came from (config.init_from)."""
    if not init:
        return []
    if init.get("kind") != "workdir":
        return [f"Initialized from torchvision weights {init.get('path')}.", ""]
    return [
        f"Initialized from {init['workdir']} step {init['step']} ({init['which']}, {init['weights']} weights, "
        f"trained on {init['dataset']}, {init['num_classes']} classes); head {init['head']}.",
        "",
    ]


def _calibration_lines(calibration: dict | None) -> list[str]:
    """report.md's calibration: the ECE and the reliability diagram (docs/inference.md says how it is binned)."""
    if not calibration or calibration["ece"] is None:
        return []
    return [
        f"Calibration: expected calibration error {calibration['ece']:.2%} over {calibration['bin_count']} "
        f"equal-width confidence bins (0 is perfectly calibrated).",
        "",
        f"![reliability diagram]({calibration['png']})",
        "",
    ]


def render_markdown(report: dict) -> str:
    """report.md: the headline numbers, speed, memory, model table, weakest classes and provenance."""
    from resnext_jax.inference.evaluation import format_bytes

    acc, data, speed, memory = report["accuracy"], report["dataset"], report.get("speed"), report["memory"]
    model, prov, source, pre = report["model"], report["provenance"], report["source"], report["preprocessing"]
    where = source.get("path") or source.get("weights")
    step = f", step {source['step']}" if source.get("step") is not None else ""
    lines = [
        f"# {model['name']} on {data['name']}:{data['split']}",
        "",
        f"Weights: {source['kind']} {where}{step} ({source.get('weights')}). Created {report['created']}.",
        "",
        "Runtime: {runtime} ({provider}), {precision}.".format(**report["runtime"]),
        "",
    ]
    lines += _init_lines((report.get("config") or {}).get("init_from_source"))
    lines += [
        "| top-1 | top-5 | loss | examples | eval time |",
        "|---|---|---|---|---|",
        (
            f"| {acc['top1']:.2%} | {acc['top5']:.2%} | {acc['loss']:.4f} | {acc['count']} | "
            f"{acc['seconds']:.1f} s on {data['devices']} device(s), batch {data['batch_size']} |"
        ),
        "",
    ]
    if report.get("training_curves"):
        lines += [f"![training curves]({report['training_curves']})", ""]
    lines += _calibration_lines(report.get("calibration"))
    if speed is not None:
        lines += [
            f"## Speed ({speed['device']}, {speed['dtype']}, {speed['resolution']}x{speed['resolution']})",
            "",
            "| batch | img/s | latency p50 | latency p95 | compile | runs |",
            "|---|---|---|---|---|---|",
        ]
        for run in speed["runs"]:
            lines.append(
                f"| {run['batch_size']} | {run['images_per_s']:.1f} | {run['latency_ms_p50']:.2f} ms | "
                f"{run['latency_ms_p95']:.2f} ms | {run['compile_s']:.2f} s | {run['iterations']} |"
            )
    kind = (
        "in use on the device"
        if memory["kind"] == "device"
        else f"host RSS; the {prov['backend']} backend reports no device memory"
    )
    lines += [
        "",
        f"Peak memory: {format_bytes(memory['peak_bytes'])} ({kind}).",
        "",
        "## Model",
        "",
        "```text",
        model["table"],
        "```",
        "",
        "## Per class",
        "",
        f"![confusion matrix]({report['confusion_matrix']['png']})",
        "",
        "Weakest classes (up to 10 with errors):",
        "",
        "| class | accuracy | examples | most confused with |",
        "|---|---|---|---|",
    ]
    rows = sorted(
        (row for row in report["per_class"] if row["count"] and row["correct"] < row["count"]),
        key=lambda row: (row["accuracy"], row["class"]),
    )
    for row in rows[:10]:
        lines.append(
            f"| {row['name']} | {row['accuracy']:.2%} | {row['count']} | {row['most_confused_with']} "
            f"({row['confused_count']}) |"
        )
    if not rows:
        lines.append("| (every example of every class is right) | | | |")
    native = prov["native_kernels"]
    ran = (
        f"yes ({native['isa']}: {', '.join(native['targets'])})"
        if native["ran"]
        else f"no ({native['unavailable_reason'] or 'not used by this model on this backend'})"
    )
    git = prov["git"]
    versions = ", ".join(f"{name} {version}" for name, version in prov["versions"].items() if version)
    lines += [
        "",
        "## Provenance",
        "",
        f"- git: {git['commit'] + (' (uncommitted changes)' if git['dirty'] else '') if git else 'none'}",
        f"- native CPU kernels ran: {ran}",
        f"- devices: {', '.join(prov['devices'])} ({prov['backend']}, {prov['process_count']} process(es))",
        f"- Python {prov['python']} on {prov['platform']}",
        f"- {versions}",
        (
            f"- preprocessing: resize {pre['resize_size']} ({pre['interpolation']}), crop {pre['crop_size']}, "
            f"mean {pre['mean']}, std {pre['std']}"
        ),
        "",
        "<details><summary>config</summary>",
        "",
        "```json",
        json.dumps(report["config"], indent=1),
        "```",
        "",
        "</details>",
        "",
    ]
    return "\n".join(lines)
