"""`load_model`'s source that is a training run: the workdir's config, its best, latest or EMA checkpoint, verified
against the checksums the run wrote, and the preprocessing the run evaluated with. Reading never writes (no Orbax
manager), so a run can be loaded while it trains."""

from __future__ import annotations

import json
import logging
import os
import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from resnext_jax.errors import UserError, drop_event_loop_noise, drop_unawaited_warnings
from resnext_jax.inference.loader import LoadedModel, Preprocessing, check_model_name, default_class_names
from resnext_jax.models.registry import create_model, model_info

log = logging.getLogger("resnext_jax.inference.loader")
WHICH = ("best", "latest", "ema")
_COMMIT_MARKER = "commit_success.txt"  # Orbax's, as in resnext_jax.training.checkpoint


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {path} ({error}); is this a resnext-jax workdir?") from error


def _complete_steps(directory: str) -> tuple[list[int], list[int]]:
    """(complete, incomplete) checkpoint steps: complete ones carry Orbax's commit marker on the step and on its
    state item (what `Checkpointer.is_complete` checks, without opening a manager that would clean up)."""
    complete, incomplete = [], []
    if not os.path.isdir(directory):
        return complete, incomplete
    for entry in os.listdir(directory):
        if not entry.isdigit():
            continue  # Orbax's *.orbax-checkpoint-tmp-* directories are saves in progress
        done = all(os.path.exists(os.path.join(directory, entry, *sub, _COMMIT_MARKER)) for sub in ((), ("state",)))
        (complete if done else incomplete).append(int(entry))
    return sorted(complete), sorted(incomplete)


def _best_step(workdir: str, steps: list[int]) -> int | None:
    """The kept step with the highest logged eval top-1 (the earliest on a tie, as the training loop's end line
    names it); a torn last line (a crash mid-write) is skipped."""
    from resnext_jax.run_files import best_eval, read_metrics

    if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        return None
    best = best_eval(read_metrics(workdir), steps)
    return None if best is None else best[1]


def _pick_step(workdir: str, which: str | int) -> tuple[int, bool]:
    directory = os.path.join(workdir, "checkpoints")
    complete, incomplete = _complete_steps(directory)
    if isinstance(which, (int, np.integer)) or str(which).isdigit():
        step = int(which)
        if step in incomplete:
            raise UserError(
                f"checkpoint step {step} in {directory} is incomplete (no commit marker: a save was cut "
                f"off); pick one of the complete steps {complete or 'none'}"
            )
        if step not in complete:
            raise UserError(f"{directory} has no checkpoint step {step}; complete steps: {complete or 'none'}")
        return step, False
    if which not in WHICH:
        raise UserError(f"which={which!r}; use one of {', '.join(WHICH)} or a step number")
    if not complete:
        extra = f" (steps {incomplete} are incomplete: their saves were cut off)" if incomplete else ""
        raise UserError(
            f"{workdir} has no complete checkpoint{extra}; train it first "
            f"(python -m train --config ... --workdir {workdir}) or pass another workdir"
        )
    for step in incomplete:
        if step > complete[-1]:
            log.warning(
                "checkpoint step %d in %s is incomplete (no commit marker); using step %d",
                step,
                directory,
                complete[-1],
            )
    if which == "best":
        best = _best_step(workdir, complete)
        return (best if best is not None else complete[-1]), False
    return complete[-1], which == "ema"


def _restore(path: str, keys: tuple[str, ...]) -> dict:
    """Restores only `keys` of a saved TrainState (no optimizer state) onto the default device."""
    import orbax.checkpoint as ocp

    drop_event_loop_noise()
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # Orbax warns that an item directory has no step metadata; it never does
    try:
        checkpointer = ocp.PyTreeCheckpointer()
        saved = checkpointer.metadata(path).item_metadata
        missing = [key for key in keys if key not in saved]
        if missing:
            raise UserError(f"{path} holds no {missing}; it was not written by this version of resnext-jax's trainer")
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = {
            key: jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), saved[key])
            for key in keys
        }
        return checkpointer.restore(
            path,
            args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
            ),
        )
    except UserError:
        raise
    except Exception as error:  # tensorstore/asyncio errors run to hundreds of lines; the cause is the damage
        drop_unawaited_warnings()
        raise UserError(
            f"cannot read checkpoint {path} ({type(error).__name__}: {str(error).splitlines()[0]}); "
            f"it is damaged: pick another step (--which latest, or a step number)"
        ) from error
    finally:
        absl_logger.setLevel(level)


def _verify(step_dir: str, restored: dict, step: int) -> None:
    """Checks the restored arrays against the CRC-32s the trainer saved beside them (`checksums`, see
    `resnext_jax.training.checkpoint.checksums`), so that a bit-flipped or truncated step is never used."""
    path = os.path.join(step_dir, "checksums", "metadata")
    if not os.path.exists(path):
        from resnext_jax.run_files import lists_item

        if lists_item(step_dir, "checksums"):  # written with checksums, which are gone: never load it unverified
            others = [other for other in _complete_steps(os.path.dirname(step_dir))[0] if other != step]
            raise UserError(
                f"checkpoint step {step} in {os.path.dirname(step_dir)} is damaged: its checksums item is missing; "
                f"pick another step ({others or 'none left'})"
            )
        log.warning("checkpoint step %d in %s predates checksums; loading it unverified", step, step_dir)
        return
    saved = _read_json(path)
    wrong = []
    for collection, tree in restored.items():
        for leaf_path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            key = f".{collection}{jax.tree_util.keystr(leaf_path)}"
            array = np.ascontiguousarray(np.asarray(leaf))
            if saved.get(key) != f"{zlib.crc32(array.view(np.uint8)):08x} {array.dtype} {list(array.shape)}":
                wrong.append(key)
    if wrong:
        others = [other for other in _complete_steps(os.path.dirname(step_dir))[0] if other != step]
        raise UserError(
            f"checkpoint step {step} in {os.path.dirname(step_dir)} fails its checksums ({len(wrong)} "
            f"arrays, e.g. {wrong[0]}): it is damaged; pick another step ({others or 'none left'})"
        )


def load_workdir(workdir: str, model: str | None, which: str | int) -> LoadedModel:
    workdir = os.path.abspath(workdir)
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise UserError(
            f"{workdir} is a directory without config.json, so not a training workdir; pass a "
            f"workdir of `python -m train`, a .pth file or a torchvision weight tag"
        )
    config = _read_json(config_path)
    name = config.get("model")
    check_model_name(name, f"{config_path}")
    if model is not None and model != name:
        raise UserError(f"{workdir} holds a {name} run, not {model}; drop --model or pass --model {name}")
    step, ema = _pick_step(workdir, which)
    if ema and not config.get("ema_decay"):
        raise UserError(f"{workdir} was trained without EMA weights (ema_decay=0); use --which best or latest")
    keys = ("ema_params", "ema_batch_stats") if ema else ("params", "batch_stats")
    step_dir = os.path.join(workdir, "checkpoints", str(step))
    restored = _restore(os.path.join(step_dir, "state"), keys)
    _verify(step_dir, restored, step)
    variables = {"params": restored[keys[0]], "batch_stats": restored[keys[1]] or {}}
    if not variables["batch_stats"]:
        del variables["batch_stats"]

    kwargs = dict(config.get("model_kwargs") or {})
    if "stage_sizes" in kwargs:
        kwargs["stage_sizes"] = tuple(kwargs["stage_sizes"])
    head = variables["params"].get("fc")
    kwargs.setdefault("num_classes", int(jax.tree.leaves(head)[0].shape[-1]) if head else 0)
    try:  # the run's compute dtype too, so evaluation reproduces its logged numbers
        module = create_model(name, dtype=jnp.bfloat16 if config.get("half_precision") else jnp.float32, **kwargs)
    except ValueError as error:
        raise UserError(f"{config_path}: {error}") from error
    info, info_error = _dataset_info(config)
    recorded, changed = _recorded_dataset(workdir, config, info)
    if recorded is not None:  # the data the run trained on, whatever the dataset on disk is now
        info = types.SimpleNamespace(
            class_names=tuple(recorded["class_names"]) if recorded.get("class_names") else None,
            mean=tuple(recorded["mean"]),
            std=tuple(recorded["std"]),
        )
    crop = int(config.get("image_size") or model_info(name).eval_size)
    mean, std = _normalization(config, name, info, info_error)
    names = default_class_names(kwargs["num_classes"], info, config.get("dataset"))
    preprocessing = Preprocessing(
        resize_size=int(config.get("eval_resize_size") or crop), crop_size=crop, mean=mean, std=std, class_names=names
    )
    source = {"kind": "workdir", "path": workdir, "step": step, "which": str(which), "weights": "ema" if ema else "raw"}
    if changed:
        source["dataset_changed"] = changed
    return LoadedModel(
        name=name,
        module=module,
        variables=variables,
        preprocessing=preprocessing,
        source=source,
        config=config,
        model_kwargs=kwargs,
    )


def _dataset_info(config: dict):
    """The run's DatasetInfo (class names, normalization), or (None, error) if the data is not on this machine."""
    from resnext_jax.data import dataset_info

    try:
        return dataset_info(config.get("dataset"), config.get("data_dir") or None), None
    except Exception as error:  # noqa: BLE001  not prepared here: the statistics may still be known
        log.info("dataset %s is not readable here (%s)", config.get("dataset"), error)
        return None, error


def _recorded_dataset(workdir: str, config: dict, info) -> tuple[dict | None, str | None]:
    """(the dataset identity the run recorded in dataset.json, or None for a run without one; one line saying how
    the dataset on disk differs from it, or None). The line is also logged as a warning."""
    path = os.path.join(workdir, "dataset.json")
    if not os.path.exists(path):
        return None, None
    recorded = _read_json(path)
    if info is None:  # the data is not on this machine: the record is all there is
        return recorded, None
    from resnext_jax.data.identity import dataset_identity, identity_differences

    try:
        current = dataset_identity(config.get("dataset"), config.get("data_dir") or None)
    except Exception as error:  # noqa: BLE001  unreadable now: the record still names the classes
        log.info("dataset %s cannot be fingerprinted here (%s)", config.get("dataset"), error)
        return recorded, None
    differences = identity_differences(recorded, current)
    if not differences:
        return recorded, None
    changed = (
        f"dataset {config.get('dataset')!r} changed since this run trained on it ({'; '.join(differences)}); "
        f"using the class names and normalization the run recorded in {path}"
    )
    log.warning(changed)
    return recorded, changed


def _normalization(config: dict, name: str, info, info_error):
    """The run's normalization: the model's ImageNet statistics with normalize='model', else the dataset's (from
    its DatasetInfo, or the built-in catalogue when the data is not on this machine)."""
    if config.get("normalize") == "model":
        preset = model_info(name)
        return tuple(preset.mean), tuple(preset.std)
    if info is not None:
        return tuple(info.mean), tuple(info.std)
    from resnext_jax.data import datasets

    spec = getattr(datasets, "_SPECS", {}).get(config.get("dataset"))
    if spec is None:
        raise UserError(
            f"the run normalized images with the statistics of dataset {config.get('dataset')!r}, "
            f"which cannot be read here ({info_error}); prepare it, or set data_dir in config.json"
        )
    return tuple(spec.mean), tuple(spec.std)
