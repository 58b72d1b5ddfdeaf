"""Errors whose message names the fix, and the one way every command line prints them.

A `UserError` is a problem with what the user gave (a path, a config field, an input shape, a full disk), so its
message is the whole story: the command-line tools print it as one line, and the traceback only with `--verbose`.
Anything else is a bug of ours and keeps its traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys
import traceback
import warnings


class UserError(Exception):
    """A problem with the user's input or environment; the message says what is wrong and how to fix it."""


class InputError(UserError, ValueError):
    """A bad value or array given to a public function (a wrong shape, an impossible model field)."""


class ConfigError(UserError, ValueError):
    """A config value or key is wrong; the message names the field and the fix."""


def disk_error(error: OSError, path: str, what: str) -> UserError | OSError:
    """A one-line `UserError` for a full disk (with the free space) or a read-only filesystem met while writing
    `what` under `path`; other OS errors come back unchanged."""
    if error.errno == errno.ENOSPC or error.errno == errno.EDQUOT:
        try:
            free = shutil.disk_usage(path if os.path.isdir(path) else os.path.dirname(path) or ".").free
            space = f"{free / 2**20:.1f} MiB free"
        except OSError:
            space = "free space unknown"
        return UserError(
            f"the disk holding {path} is full ({space}) while writing {what}; free some space or "
            f"use another directory, then rerun"
        )
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return UserError(
            f"{path} is not writable ({os.strerror(error.errno)}) while writing {what}; "
            f"use a writable directory, then rerun"
        )
    return error


def check_output_path(path: str, flag: str, *, directory: bool = False, example: str = "out") -> None:
    """Raises a one-line `UserError` unless `path` (a command's `--out`) can be written: a file path that is not an
    existing directory, or a folder (with `directory`) that is not an existing file; missing parent folders are
    created. Checked before any long work, so a typo costs seconds, not an evaluation."""
    path = os.path.abspath(path)
    if not directory and os.path.isdir(path):
        raise UserError(f"{flag} {path} is a directory; give a file path, e.g. {os.path.join(path, example)}")
    if directory and os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file; give a folder path, e.g. {path}_report")
    folder = path if directory else os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        raise UserError(
            f"{flag} {path} cannot be written ({error.strerror or error} at {error.filename or folder}); "
            f"choose a writable {'folder' if directory else 'path'}"
        ) from None


def drop_event_loop_noise() -> None:
    """Keeps Orbax's asynchronous noise out of the terminal. When a damaged checkpoint fails to read, the read's
    leftovers report themselves after the one warning that already names the problem: pending callbacks meet the
    closed asyncio loop (`RuntimeError('Event loop is closed')`), unfinished coroutines raise tensorstore's error
    as they are collected (both through `sys.unraisablehook`, dozens of tracebacks), and tasks and futures log
    "... exception was never retrieved". Which of these appear depends on timing. Only reports whose error is the
    closed loop's or the read's are dropped; installed once per process. See also `drop_unawaited_warnings`."""
    previous = sys.unraisablehook
    if getattr(previous, "_drops_event_loop_noise", False):
        return

    def hook(unraisable):
        if not _is_read_leftover(unraisable.exc_value):
            previous(unraisable)

    hook._drops_event_loop_noise = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(
        lambda record: not (record.exc_info and _is_read_leftover(record.exc_info[1]))
    )


def drop_unawaited_warnings() -> None:
    """Called once a checkpoint read has failed: its unstarted coroutines warn "coroutine ... was never awaited"
    when collected, often at interpreter exit where the warning names no module, so from then on this process
    ignores that warning."""
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)


def _is_read_leftover(error: BaseException | None) -> bool:
    """Whether `error` is the closed asyncio loop's, or a checkpoint read's: tensorstore's (its message names a
    TensorStore spec or the OCDBT database) or raised inside Orbax."""
    if error is None:
        return False
    text = str(error)
    if isinstance(error, RuntimeError) and text == "Event loop is closed":
        return True
    if any(mark in text for mark in ("TensorStore", "tensorstore", "OCDBT")):
        return True
    return any("/orbax/" in frame.filename for frame in traceback.extract_tb(error.__traceback__))


def run_cli(main, argv: list[str] | None = None, *, verbose: bool | None = None) -> int:
    """Runs `main(argv)` and turns a `UserError` (or a disk error) into one `error: ...` line on stderr and exit
    code 2; with `verbose` (default: `--verbose` in argv) the traceback is printed too. Returns main's exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if verbose is None:
        verbose = "--verbose" in argv
    try:
        return main(argv) or 0
    except UserError as error:
        if verbose:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
