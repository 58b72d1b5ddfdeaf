"""Command line: `python -m train --config configs/quickstart.py [--config.field=value ...] [--workdir DIR]`.

Also installed as the `resnext-train` console script. Rerunning the same command resumes the run.
"""

from __future__ import annotations

import ast
import difflib
import logging as std_logging
import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (e.g. configs/quickstart.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory for checkpoints and logs; default runs/<config file name>.")
flags.DEFINE_bool(
    "allow_changes",
    False,
    "Resume a run whose config differs from the workdir's in optimization "
    "fields only (learning rate, schedule, clipping, regularization); the change is recorded in "
    "config_changes.jsonl.",
)
flags.DEFINE_bool("verbose", False, "Print the traceback behind a one-line error.")

_MODEL_KWARGS = "--config.model_kwargs."


def default_workdir(config_path: str) -> str:
    """`runs/<config file stem>` under the current directory, e.g. runs/quickstart."""
    return os.path.join("runs", os.path.splitext(os.path.basename(config_path.split(":")[0]))[0])


def _run(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; config fields are set with --config.field=value")
    if not FLAGS["verbosity"].present:  # Orbax logs every save at INFO; keep the console to the bar and epochs
        logging.set_verbosity(logging.WARNING)
    if FLAGS.verbose:  # multi-host: keep the distributed runtime's own fault reports (training.peers)
        os.environ["RESNEXT_JAX_VERBOSE"] = "1"
    if not FLAGS.verbose:  # Orbax's async writes report a full disk once per array as asyncio task errors
        std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
    from resnext_jax.errors import UserError
    from resnext_jax.training.loop import train_and_evaluate

    if FLAGS.config is None:
        raise app.UsageError("--config is required, e.g. --config configs/quickstart.py")
    workdir = FLAGS.workdir or default_workdir(flags.FLAGS["config"].config_filename)
    try:
        summary = train_and_evaluate(FLAGS.config, workdir, allow_changes=FLAGS.allow_changes)
    except UserError as error:  # errors whose message names the fix: one line, the traceback behind --verbose
        if FLAGS.verbose:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2 if isinstance(error, ValueError) else 1)
    logging.info("summary: %s", summary)


def _split_model_kwargs(argv: list[str]) -> tuple[list[str], dict]:
    """Takes `--config.model_kwargs.FIELD=VALUE` out of argv: `model_kwargs` starts empty in most configs, and the
    locked config would refuse a key it does not hold yet. Values are Python literals (`0.1`, `(1, 1)`, `True`) or
    plain strings (`silu`)."""
    rest, kwargs = [], {}
    for arg in argv:
        if arg.startswith(_MODEL_KWARGS) and "=" in arg:
            key, text = arg[len(_MODEL_KWARGS) :].split("=", 1)
            try:
                kwargs[key] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                kwargs[key] = text
        else:
            rest.append(arg)
    return rest, kwargs


def _model_fields(name: str) -> set[str] | None:
    """The module fields `create_model(name, **overrides)` accepts, or None for an unknown model (whose error comes
    later, with the close names)."""
    from resnext_jax.models.registry import model_fields

    try:
        return model_fields(name)
    except (KeyError, ValueError):
        return None


def _apply_model_kwargs(config, kwargs: dict) -> None:
    """Sets the model_kwargs overrides, refusing a field the model does not have (with the closest names)."""
    if not kwargs:
        return
    fields = _model_fields(config.model)
    for key, value in kwargs.items():
        if fields is not None and key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=3, cutoff=0.6)
            hint = f' Did you mean "{close[0]}"?' if close else ""
            sys.exit(
                f"error: unknown config override --config.model_kwargs.{key}: {config.model} has no field "
                f"{key!r}.{hint} Its fields: {', '.join(sorted(fields))}"
            )
        with config.unlocked():
            config.model_kwargs[key] = list(value) if isinstance(value, tuple) else value


def _parse_flags(argv):
    """absl's parser, with one-line errors for a bad --config file or --config.field override."""
    argv, model_kwargs = _split_model_kwargs(list(argv))
    # config_flags re-reads the overrides from sys.argv when the config first loads: take them out there too.
    sys.argv = [arg for arg in sys.argv if not arg.startswith(_MODEL_KWARGS)]
    try:
        args = FLAGS(argv)
        if FLAGS.config is not None:
            FLAGS.config.keys()  # the config file loads lazily; surface a load failure here
            _apply_model_kwargs(FLAGS.config, model_kwargs)
        return args
    except (KeyError, AttributeError) as error:  # ml_collections' "Did you mean ..." for an unknown field
        while error.args and isinstance(error.args[0], BaseException):
            error = error.args[0]
        sys.exit(f"error: unknown config override {error.args[0] if error.args else error}")
    except OSError as error:
        sys.exit(f"error: {error}")
    except SyntaxError as error:  # a config file that is not valid Python
        sys.exit(f"error: the config file does not parse: {error.msg} ({error.filename}, line {error.lineno})")
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
