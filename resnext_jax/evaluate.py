"""`python -m resnext_jax.evaluate SOURCE [--dataset NAME[:split]] [--speed off|quick|full] [--out DIR]`

Evaluates a trained workdir, torchvision or timm weights (anything `load_model` accepts) over a whole split and
writes report.json, report.md, confusion_matrix.png and reliability.png: top-1, top-5, loss, per-class accuracy,
calibration (expected calibration error and the reliability diagram), speed (img/s, p50/p95 latency, compile time
apart) at each batch size, peak memory, the model's per-stage table and the provenance. Images go through the
weights' own preset (a timm tag's crop_pct and bicubic resize). Every field is explained in docs/inference.md.
"""

from __future__ import annotations

import argparse
import sys

from resnext_jax.errors import check_output_path, run_cli

# --speed: (batch sizes, timed seconds per batch size); "off" skips the speed pass.
SPEED = {"off": ((), 0.0), "quick": ((1, 64), 0.5), "full": ((1, 8, 64), 2.0)}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m resnext_jax.evaluate", description=__doc__.split("\n\n")[1])
    parser.add_argument(
        "source",
        help="a training workdir, a torchvision .pth file or weight tag (IMAGENET1K_V2), "
        "a timm .safetensors file or weight tag (regnety_032.ra_in1k), or an exported .onnx or .stablehlo file",
    )
    parser.add_argument("--dataset", help="NAME or NAME:split (default: the run's dataset and its eval split)")
    parser.add_argument(
        "--model",
        help="builder name, required for torchvision weights; or a timm weight tag, "
        "whose preset (crop_pct, interpolation) is then used",
    )
    parser.add_argument("--which", default="best", help="workdir weights: best, latest, ema or a step number")
    parser.add_argument("--data-dir", help="dataset directory (default: the run's, else $TFDS_DATA_DIR)")
    parser.add_argument("--batch", type=int, help="accuracy pass batch size (default: the run's eval batch)")
    parser.add_argument(
        "--speed",
        choices=tuple(SPEED),
        default="quick",
        help="off: the accuracy pass only, no speed section; quick (default): batch 1 and 64 for 0.5 s each; "
        "full: batch 1, 8 and 64 for 2 s each",
    )
    parser.add_argument("--batch-sizes", help="speed: comma-separated batch sizes (overrides --speed's)")
    parser.add_argument("--min-seconds", type=float, help="speed: timed seconds per batch size (overrides --speed's)")
    parser.add_argument("--out", help="report folder (default: WORKDIR/report)")
    parser.add_argument("--verbose", action="store_true", help="tracebacks for errors")
    args = parser.parse_args(argv)
    preset_sizes, preset_seconds = SPEED[args.speed]
    if args.speed == "off" and (args.batch_sizes or args.min_seconds is not None):
        parser.error("--batch-sizes and --min-seconds time the speed pass, which --speed off skips; drop one")
    if args.min_seconds is None:
        args.min_seconds = preset_seconds
    if args.batch_sizes is None:
        args.batch_sizes = preset_sizes
        return _check_batch(parser, args)
    try:
        args.batch_sizes = tuple(int(size) for size in args.batch_sizes.split(",") if size.strip())
    except ValueError:
        parser.error(f"--batch-sizes {args.batch_sizes!r}: use comma-separated integers, e.g. 1,8,64")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        parser.error("--batch-sizes needs positive integers, e.g. 1,8,64")
    return _check_batch(parser, args)


def _check_batch(parser, args):
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch {args.batch} must be a positive integer, e.g. 64")
    return args


def accuracy_line(report: dict) -> str:
    """The report's one accuracy line; top-5 only with more than 5 classes (with 5 or fewer it is 100% by
    construction)."""
    accuracy, data = report["accuracy"], report["dataset"]
    top5 = f"top-5 {accuracy['top5']:.2%}, " if data["num_classes"] > 5 else ""
    return (
        f"{report['model']['name']} on {data['name']}:{data['split']}: top-1 {accuracy['top1']:.2%}, "
        f"{top5}loss {accuracy['loss']:.4f} over {accuracy['count']} examples"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.out:
        check_output_path(args.out, "--out", directory=True)
    from resnext_jax.inference.report import evaluate_and_report
    from resnext_jax.precision import bf16_cpu_note

    report = evaluate_and_report(
        args.source,
        dataset=args.dataset,
        model=args.model,
        which=args.which,
        data_dir=args.data_dir,
        batch_size=args.batch,
        speed_batch_sizes=args.batch_sizes,
        min_seconds=args.min_seconds,
        out_dir=args.out,
    )
    print(accuracy_line(report))
    if report["calibration"]["ece"] is not None:
        print(f"expected calibration error {report['calibration']['ece']:.2%}")
    for run in report["speed"]["runs"] if "speed" in report else ():
        print(
            f"batch {run['batch_size']}: {run['images_per_s']:.1f} img/s, p50 {run['latency_ms_p50']:.2f} ms, "
            f"p95 {run['latency_ms_p95']:.2f} ms (compile {run['compile_s']:.2f} s)"
        )
    print(f"report: {report['report_dir']}/report.md")
    if note := bf16_cpu_note(report["runtime"]["precision"], "evaluate"):
        print(note, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
