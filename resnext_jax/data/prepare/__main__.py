"""`python -m resnext_jax.data.prepare`: prepare an image folder, CIFAR, Imagenette or ImageNet for training.

    python -m resnext_jax.data.prepare folder ~/photos --name my_photos          # ~/photos/<class>/<image>.jpg
    python -m train --config configs/finetune_folder.py --config.dataset=my_photos

Nothing here imports TensorFlow. Errors the user can fix print as one line (the traceback with --verbose).
"""

from __future__ import annotations

import argparse
import os
import sys

from resnext_jax.errors import run_cli

_EPILOG = """examples (PREPARE = python -m resnext_jax.data.prepare):
  PREPARE folder ~/photos --name my_photos             # 10% of each class becomes validation
  PREPARE folder ~/photos/train --val-dir ~/photos/val --name my_photos
  PREPARE cifar10 --from cifar-10-binary.tar.gz
  PREPARE imagenette --from imagenette2-320.tgz
  PREPARE imagenet2012 --from DIR                      # DIR holds ILSVRC2012_img_{train,val}.tar

The dataset is written to DATA_DIR/NAME (DATA_DIR defaults to $TFDS_DATA_DIR, else ~/tensorflow_datasets); train
on it with --config.dataset=NAME (and --config.data_dir=DATA_DIR if you passed --data-dir)."""


def _parser() -> argparse.ArgumentParser:
    from resnext_jax.data.datasets import default_data_dir

    parser = argparse.ArgumentParser(
        prog="python -m resnext_jax.data.prepare",
        epilog=_EPILOG,
        formatter_class=argparse.RawTextHelpFormatter,
        description="Prepare images as an ArrayRecord dataset that resnext_jax trains on (no TensorFlow needed).",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=default_data_dir(), help="where datasets live (default: %(default)s)")
    common.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes that check or encode images (default: %(default)s; 0: this process)",
    )
    common.add_argument("--overwrite", action="store_true", help="replace a dataset of the same name")
    common.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    common.add_argument("--verbose", action="store_true", help="print tracebacks with errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    folder = commands.add_parser(
        "folder",
        parents=[common],
        help="a folder laid out as DIR/<class>/<image>",
        description="Class names are the sorted subfolder names; non-image files are "
        "ignored, undecodable images skipped, both listed in the summary.",
    )
    folder.add_argument("dir", metavar="DIR", help="the image folder, DIR/<class>/<image>.jpg")
    folder.add_argument("--name", required=True, help="the dataset's name, e.g. my_photos")
    split = folder.add_mutually_exclusive_group()
    split.add_argument("--val-dir", help="a validation folder with the same class subfolders")
    split.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of each class held out for validation, the same files on every machine (default: %(default)s)",
    )
    for name, archive in (
        ("cifar10", "cifar-10-binary.tar.gz"),
        ("cifar100", "cifar-100-binary.tar.gz"),
        ("imagenette", "imagenette2.tgz, imagenette2-320.tgz or imagenette2-160.tgz"),
    ):
        command = commands.add_parser(name, parents=[common], help=f"from {archive}")
        command.add_argument("--from", dest="source", required=True, metavar="ARCHIVE", help=f"the {archive}")
    imagenet = commands.add_parser(
        "imagenet2012", parents=[common], help="from ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar"
    )
    imagenet.add_argument(
        "--from", dest="source", required=True, metavar="DIR", help="the folder that holds the two tars"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parses the command line, prepares the dataset and prints its summary; returns the exit code."""
    args = _parser().parse_args(argv)
    options = {
        "data_dir": os.path.abspath(os.path.expanduser(args.data_dir)),
        "workers": args.workers,
        "overwrite": args.overwrite,
        "quiet": args.quiet,
    }
    if args.command == "folder":
        from resnext_jax.data.prepare.folder import prepare_folder

        report = prepare_folder(args.dir, args.name, val_dir=args.val_dir, val_fraction=args.val_fraction, **options)
        name = args.name
    elif args.command in ("cifar10", "cifar100"):
        from resnext_jax.data.prepare.archives import prepare_cifar

        report = prepare_cifar(args.command, args.source, **options)
        name = args.command
    elif args.command == "imagenette":
        from resnext_jax.data.prepare.archives import prepare_imagenette

        report = prepare_imagenette(args.source, **options)
        name = "imagenette/" + os.path.basename(os.path.dirname(report.target))
    else:
        from resnext_jax.data.prepare.imagenet import prepare_imagenet

        report = prepare_imagenet(args.source, **options)
        name = "imagenet2012"
    if not args.quiet:
        print(report.summary(report.target), file=sys.stderr)
        data_dir = (
            "" if options["data_dir"] == os.path.abspath(_default()) else f" --config.data_dir={options['data_dir']}"
        )
        print(f"train on it with: python -m train --config CONFIG --config.dataset={name}{data_dir}", file=sys.stderr)
    return 0


def _default() -> str:
    from resnext_jax.data.datasets import default_data_dir

    return default_data_dir()


if __name__ == "__main__":
    sys.exit(run_cli(main))
