"""Command line: `python -m train --config configs/quickstart.py [--config.field=value ...] [--workdir DIR]`.

Also installed as the `resnext-train` console script. Rerunning the same command resumes the run.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (e.g. configs/quickstart.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory for checkpoints and logs; default runs/<config file name>.")


def default_workdir(config_path: str) -> str:
    """`runs/<config file stem>` under the current directory, e.g. runs/quickstart."""
    return os.path.join("runs", os.path.splitext(os.path.basename(config_path.split(":")[0]))[0])


def _run(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; config fields are set with --config.field=value")
    if not FLAGS["verbosity"].present:  # Orbax logs every save at INFO; keep the console to the bar and epochs
        logging.set_verbosity(logging.WARNING)
    from resnext_jax.training.config import ConfigError
    from resnext_jax.training.loop import train_and_evaluate
    if FLAGS.config is None:
        raise app.UsageError("--config is required, e.g. --config configs/quickstart.py")
    workdir = FLAGS.workdir or default_workdir(flags.FLAGS["config"].config_filename)
    try:
        summary = train_and_evaluate(FLAGS.config, workdir)
    except (ConfigError, FloatingPointError, FileNotFoundError) as error:  # errors whose message names the fix
        logging.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2 if isinstance(error, ConfigError) else 1)
    logging.info("summary: %s", summary)


def _parse_flags(argv):
    """absl's parser, with one-line errors for a bad --config file or --config.field override."""
    try:
        args = FLAGS(argv)
        if FLAGS.config is not None:
            FLAGS.config.keys()  # the config file loads lazily; surface a load failure here
        return args
    except (KeyError, AttributeError) as error:  # ml_collections' "Did you mean ..." for an unknown field
        while error.args and isinstance(error.args[0], BaseException):
            error = error.args[0]
        sys.exit(f"error: unknown config override {error.args[0] if error.args else error}")
    except OSError as error:
        sys.exit(f"error: {error}")
    except flags.Error as error:
        sys.exit(f"error: {error}\nRun with --helpfull to list the flags.")


def main(argv=None) -> None:
    """Parses flags and trains, in this process."""
    app.run(_run, argv=argv, flags_parser=_parse_flags)


def console_main() -> None:
    """`python -m train` and the `resnext-train` console script.

    Restarts once with glibc malloc's huge pages for XLA:CPU's per-step buffers (see
    `resnext_jax.ops.host_memory`; `RESNEXT_JAX_HUGEPAGES=0` turns it off), then runs `main`.
    """
    from resnext_jax.ops.host_memory import reexec_with_huge_pages
    reexec_with_huge_pages()
    main()
