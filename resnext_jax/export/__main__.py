"""`python -m resnext_jax.export SOURCE --format stablehlo|onnx --out PATH [--model NAME] [--batch dynamic|N]
[--resolution 224] [--with-preprocessing] [--dtype float32|bfloat16]
[--quantize int8 --calibrate NAME[:split] [--calibration-images 512] [--max-drop 1.0]]`

Exports a trained workdir or torchvision weights (anything `load_model` accepts) for serving, verifies the file
against `model.apply` (StableHLO: deserialized and run; ONNX: in onnxruntime) and writes it with a sidecar
`PATH.json`. A file that does not reproduce JAX's logits is never written.
"""

from __future__ import annotations

import argparse
import sys
import time

from resnext_jax.errors import UserError, check_output_path, run_cli


def _batch(value: str) -> int | None:
    if value == "dynamic":
        return None
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise argparse.ArgumentTypeError(f"{value!r}: use 'dynamic' or a positive batch size")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m resnext_jax.export", description=__doc__.split("\n\n")[1])
    parser.add_argument("source", help="a training workdir, a torchvision .pth file or a weight tag (IMAGENET1K_V2)")
    parser.add_argument("--format", required=True, choices=("stablehlo", "onnx"))
    parser.add_argument("--out", required=True, help="the file to write; its sidecar is OUT.json")
    parser.add_argument("--model", help="builder name; required for torchvision weights")
    parser.add_argument("--which", default="best", help="workdir weights: best, latest, ema or a step number")
    parser.add_argument(
        "--batch",
        type=_batch,
        default=None,
        metavar="dynamic|N",
        help="a fixed batch size, or 'dynamic' (default): any batch with one file",
    )
    parser.add_argument("--resolution", type=int, help="square input size (default: the preset's crop)")
    parser.add_argument(
        "--with-preprocessing",
        action="store_true",
        help="take uint8 NHWC images (resized and cropped) and normalize inside",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="compute dtype (ONNX: float32 only); input and logits stay float32",
    )
    parser.add_argument("--quantize", choices=("int8",), help="ONNX only: static int8 (QDQ, per-channel weights)")
    parser.add_argument("--calibrate", metavar="NAME[:split]", help="int8 calibration data (default split: train)")
    parser.add_argument("--calibration-images", type=int, default=512, help="int8: images to calibrate on")
    parser.add_argument("--max-drop", type=float, default=1.0, help="int8: refuse if top-1 falls more points than this")
    parser.add_argument("--data-dir", help="int8: dataset directory (default: the run's, else $TFDS_DATA_DIR)")
    parser.add_argument("--verbose", action="store_true", help="tracebacks for errors")
    args = parser.parse_args(argv)
    if args.quantize and args.format != "onnx":
        raise UserError("--quantize int8 needs --format onnx (StableHLO artifacts are float32 or bfloat16)")
    if args.quantize and not args.calibrate:
        raise UserError("--quantize int8 needs --calibrate NAME[:split], the images to calibrate on (e.g. digits)")
    if args.calibration_images < 1 or args.max_drop < 0:
        raise UserError("--calibration-images must be positive and --max-drop at least 0")
    if args.resolution is not None and args.resolution < 32:
        parser.error("--resolution must be at least 32 (the models downsample 32x)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    check_output_path(args.out, "--out", example=f"model.{'mlir' if args.format == 'stablehlo' else 'onnx'}")
    from resnext_jax.export import export
    from resnext_jax.inference import load_model

    if args.format == "onnx":  # before minutes of loading
        from resnext_jax.export.onnx_export import check_dtype

        check_dtype(args.dtype)
    start = time.perf_counter()
    loaded = load_model(args.source, model=args.model, which=args.which)
    print(
        f"exporting {loaded.name} as {args.format} (lowering, then verifying the file against JAX; about 15 s "
        f"for a ResNeXt-50 on 2 cores)...",
        file=sys.stderr,
        flush=True,
    )
    metadata = export(
        loaded,
        args.out,
        format=args.format,
        batch=args.batch,
        resolution=args.resolution,
        with_preprocessing=args.with_preprocessing,
        dtype=args.dtype,
        **(
            {
                "quantize": args.quantize,
                "calibrate": args.calibrate,
                "calibration_images": args.calibration_images,
                "max_drop": args.max_drop,
                "data_dir": args.data_dir,
            }
            if args.quantize
            else {}
        ),
    )
    shape = ["batch" if dim is None else dim for dim in metadata["input"]["shape"]]
    parity = metadata["parity"]
    print(
        f"wrote {args.out} ({metadata['bytes'] / 2**20:.1f} MiB) and {args.out}.json in "
        f"{time.perf_counter() - start:.0f} s: input {metadata['input']['dtype']} {shape} NHWC, "
        f"preprocessing {'inside' if metadata['preprocessing']['inside'] else 'outside'}, "
        f"max-abs error vs JAX {parity['max_abs_error']:.2g} (tolerance {parity['tolerance']:.2g})"
        + (f", platforms {', '.join(metadata['platforms'])}" if "platforms" in metadata else "")
    )
    if "int8" in metadata:
        int8 = metadata["int8"]
        print(
            f"int8: top-1 {int8['int8_top1']:.2%} against float32 {int8['float32_top1']:.2%} on "
            f"{int8['dataset']}:{int8['split']} ({int8['count']} images), a drop of {int8['drop_points']:.2f} points"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
