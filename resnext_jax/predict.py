"""`python -m resnext_jax.predict SOURCE IMAGES... [--model NAME] [--top-k 5] [--batch 64] [--json|--csv]`

Top-k classes of image files with a trained workdir, torchvision or timm weights (anything `load_model` accepts).
IMAGES are files, folders (searched recursively) or globs. Each bad file gets one `error: PATH: ...` line on
stderr and the others still get predictions; the exit code is 1 if any file failed (2 if nothing could run).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys

from resnext_jax.errors import UserError, run_cli

PROGRESS_MIN_IMAGES = 48  # below a few dozen images the bar is noise


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m resnext_jax.predict", description=__doc__.splitlines()[2])
    parser.add_argument(
        "source",
        help="a training workdir, a torchvision .pth file or weight tag (IMAGENET1K_V2), "
        "a timm .safetensors file or weight tag (regnety_032.ra_in1k), or an exported .onnx or .stablehlo file",
    )
    parser.add_argument("images", nargs="+", help="image files, folders (recursive) or globs")
    parser.add_argument(
        "--model",
        help="builder name, required for torchvision weights; or a timm weight tag, "
        "whose preset (crop_pct, interpolation) is then used",
    )
    parser.add_argument("--which", default="best", help="workdir weights: best, latest, ema or a step number")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64, help="images per forward pass")
    parser.add_argument("--resize", type=int, help="override the preset's shorter-side resize")
    parser.add_argument("--crop", type=int, help="override the preset's center crop")
    parser.add_argument("--max-pixels", type=int, help="refuse larger images (default 100 million)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON object per image")
    output.add_argument("--csv", action="store_true", help="CSV: path,rank,class,name,probability")
    parser.add_argument("--verbose", action="store_true", help="tracebacks for errors")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch < 1:
        parser.error("--top-k and --batch must be positive")
    if args.max_pixels is not None and args.max_pixels < 1:
        parser.error(f"--max-pixels {args.max_pixels} must be a positive pixel count (default 100000000)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import tqdm

    from resnext_jax.inference import images as image_io
    from resnext_jax.inference import load_model, predict_files
    from resnext_jax.precision import bf16_cpu_note

    paths, problems = image_io.find_images(args.images)
    for pattern, message in problems:
        print(f"error: {pattern}: {message}", file=sys.stderr)
    if not paths:
        raise UserError("no image files to predict; pass image files, folders or globs")
    loaded = load_model(args.source, model=args.model, which=args.which, resize_size=args.resize, crop_size=args.crop)
    if note := bf16_cpu_note(loaded.module.dtype, "predict"):
        print(note, file=sys.stderr)
    writer = csv.writer(sys.stdout) if args.csv else None
    if writer:
        writer.writerow(["path", "rank", "class", "name", "probability"])
    failed = len(problems)
    bar = tqdm.tqdm(
        total=len(paths), unit="img", file=sys.stderr, disable=len(paths) < PROGRESS_MIN_IMAGES, dynamic_ncols=True
    )
    kwargs = {"max_pixels": args.max_pixels} if args.max_pixels else {}
    for result in predict_files(loaded, paths, top_k=args.top_k, batch_size=args.batch, progress=bar, **kwargs):
        if result.error:
            failed += 1
            bar.write(f"error: {result.path}: {result.error}", file=sys.stderr)
            continue
        for note in result.notes:
            bar.write(f"note: {result.path}: {note}", file=sys.stderr)
        if args.json:
            top = [{"class": label, "name": name, "probability": prob} for label, name, prob in result.top_k]
            line = json.dumps({"path": result.path, "top_k": top})
        elif writer:
            for rank, (label, name, prob) in enumerate(result.top_k, 1):
                writer.writerow([result.path, rank, label, name, f"{prob:.6f}"])
            continue
        else:
            line = f"{result.path}: " + " | ".join(f"{name} {prob:.4f}" for _, name, prob in result.top_k)
        bar.write(line, file=sys.stdout)
    bar.close()
    if failed:
        print(f"{failed} of {len(paths) + len(problems)} inputs failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
