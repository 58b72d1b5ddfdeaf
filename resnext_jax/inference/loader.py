"""`load_model`: one way from a training workdir or torchvision weights to a module, its variables and the exact
preprocessing its eval numbers were measured with.

    loaded = resnext_jax.load_model("runs/quickstart")                       # best checkpoint of a run
    loaded = resnext_jax.load_model("resnext50_32x4d-1a0047aa.pth", model="resnext50_32x4d")
    logits = loaded.module.apply(loaded.variables, images, train=False)    # images: NHWC, normalized

Reading a workdir never writes to it (no Orbax manager, no temp-directory cleanup), so a model can be loaded while
its run is still training.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import zlib
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np

from resnext_jax.errors import UserError
from resnext_jax.models.registry import create_model, list_models, model_info

log = logging.getLogger(__name__)

WHICH = ("best", "latest", "ema")
_COMMIT_MARKER = "commit_success.txt"  # Orbax's, as in resnext_jax.training.checkpoint


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How an image becomes model input, as `create_eval_loader(..., interpolation=...)` does it.

    Attributes:
      resize_size: the shorter side is resized to this (with `interpolation`), then
      crop_size: the central crop_size x crop_size square is kept, and each RGB value v in [0, 1] becomes
      mean, std: (v - mean) / std per channel.
      class_names: one name per output class (torchvision's spelling for ImageNet; '0'..'9' for digits).
      interpolation: the resize filter, "bilinear" (antialiased; torchvision's presets and training runs) or
        "bicubic" (most timm weights: their resize_size is floor(crop_size / crop_pct)).
    """
    resize_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, ...]
    interpolation: str = "bilinear"


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A ready-to-run model: `module.apply(variables, images, train=False)` gives float32 logits.

    Attributes:
      name: the registry builder name (e.g. 'resnext50_32x4d').
      module: the Flax module (built without a BatchNorm axis name, for plain jit).
      variables: {'params', 'batch_stats'} on the default device.
      preprocessing: see `Preprocessing`.
      source: what was loaded, for reports: {'kind': 'workdir'|'torchvision', 'path', 'step', 'weights', ...}.
      config: the run's resolved config (config.json) for a workdir, else None.
      model_kwargs: the `create_model` fields besides the name (so `summarize` can rebuild the same model).
    """
    name: str
    module: object
    variables: dict
    preprocessing: Preprocessing
    source: dict
    config: dict | None
    model_kwargs: dict


def imagenet_class_names() -> tuple[str, ...]:
    """ImageNet-1k's 1000 class names as torchvision spells them (`meta['categories']`), read from the package
    so predictions on converted weights are readable offline and without torch."""
    text = resources.files("resnext_jax.inference").joinpath("imagenet_classes.txt").read_text()
    return tuple(text.splitlines())


def default_class_names(num_classes: int, dataset_info=None, dataset: str | None = None) -> tuple[str, ...]:
    """Names for `num_classes` outputs: the dataset's if it has them, ImageNet's for 1000 outputs of torchvision
    weights or an imagenet2012 run, else '0', '1', ..."""
    names = getattr(dataset_info, "class_names", None)
    if names and len(names) == num_classes:
        return tuple(names)
    if num_classes == 1000 and dataset in (None, "imagenet2012"):
        return imagenet_class_names()
    return tuple(str(index) for index in range(num_classes))


def load_model(source: str, *, model: str | None = None, which: str | int = "best",
               resize_size: int | None = None, crop_size: int | None = None) -> LoadedModel:
    """Loads a usable model from a training workdir, a torchvision `.pth` file or a torchvision weight tag.

    Args:
      source: a workdir (holds config.json and checkpoints/), a `.pth`/`.pt` state_dict file, a torchvision
        weight tag ('IMAGENET1K_V1', 'IMAGENET1K_V2', 'DEFAULT'; torchvision downloads it once), timm's
        `.safetensors` file, or a timm weight tag ('regnety_032.ra_in1k'; downloaded from the Hugging Face hub).
      model: the builder name; required for torchvision weights, and must match the run's model for a workdir.
        A timm weight tag here ('resnext50_32x4d.a1h_in1k') names the model and the preset its file was
        evaluated with (timm's crop_pct and bicubic resize); a timm-only name takes its default weights' preset.
      which: for a workdir, 'best' (highest logged eval top-1 among the kept checkpoints; the latest if none
        was evaluated), 'latest', 'ema' (the EMA weights of the latest checkpoint) or a step number.
      resize_size, crop_size: override the preset (e.g. a .pth whose preset is not torchvision's).

    Raises:
      UserError: with the fix in its message (no checkpoint, unknown model, missing `model=`, incomplete step...).
    """
    source = os.fspath(source)
    _refuse_exported(source)
    if os.path.isdir(source):
        loaded = _load_workdir(source, model, which)
    elif _is_timm(source, model):
        loaded = _load_timm(source, model)
    else:
        loaded = _load_torchvision(source, model)
    pre = loaded.preprocessing
    pre = dataclasses.replace(pre, resize_size=resize_size or pre.resize_size, crop_size=crop_size or pre.crop_size)
    if pre.resize_size < pre.crop_size:
        raise UserError(f"resize size {pre.resize_size} is smaller than the crop {pre.crop_size}; "
                        f"pass a resize size of at least {pre.crop_size}")
    return dataclasses.replace(loaded, preprocessing=pre)


def _check_model_name(name, what: str) -> None:
    if name not in list_models():
        import difflib
        close = difflib.get_close_matches(str(name), list_models(), n=3, cutoff=0.5)
        hint = f" (closest: {', '.join(close)})" if close else ""
        raise UserError(f"{what} names unknown model {name!r}{hint}; use one of resnext_jax.list_models()")


# ---------------------------------------------------------------------------------------------------------------
# exported artifacts (resnext_jax.export)


def _refuse_exported(source: str) -> None:
    """An exported artifact holds a compiled program, not the module and variables `LoadedModel` promises; rather
    than failing as a bad torch file, point to `resnext_jax.export.load`, which runs it."""
    if not os.path.isfile(source):
        return
    exported = source.endswith((".stablehlo", ".onnx"))
    try:
        with open(source + ".json") as f:
            exported = exported or json.load(f).get("format") == "resnext_jax.export"
    except (OSError, ValueError, AttributeError):
        pass
    if exported:
        raise UserError(f"{source} is an exported model (python -m resnext_jax.export): it holds a compiled program, "
                        f"not the Flax module and variables load_model returns; run it with "
                        f"resnext_jax.export.load({source!r}), or pass the workdir or weights it was exported from")


# ---------------------------------------------------------------------------------------------------------------
# torchvision weights


def _torchvision_tag(name: str, path: str) -> str | None:
    """The weight tag whose download URL ends in `path`'s file name (e.g. resnext50_32x4d-1a0047aa.pth is V2)."""
    try:
        import torchvision
        for weights in torchvision.models.get_model_weights(name):
            if os.path.basename(weights.url) == os.path.basename(path):
                return weights.name
    except Exception:  # noqa: BLE001  torchvision missing or unaware of `name`: fall back to the default preset
        return None
    return None


def _load_torchvision(source: str, model: str | None) -> LoadedModel:
    is_file = os.path.exists(source) or source.endswith((".pth", ".pt"))
    if not os.path.exists(source) and (is_file or os.sep in source):
        raise UserError(f"{source} does not exist; pass a workdir, a .pth file or a torchvision weight tag")
    if model is None:
        what = f"{source} is a weights file" if is_file else f"{source!r} is not a directory, so it is read as " \
                                                             f"a torchvision weight tag"
        raise UserError(f"{what}; pass the model it belongs to, e.g. --model resnext50_32x4d "
                        f"(load_model(..., model=NAME))")
    _check_model_name(model, "--model")
    info = model_info(model)
    if is_file:
        tag = _torchvision_tag(model, source)
    elif source == "DEFAULT":  # torchvision's DEFAULT is the newest weights
        tag = "IMAGENET1K_V2" if "IMAGENET1K_V2" in info.weights else "IMAGENET1K_V1"
    else:
        tag = source
    if not is_file and tag not in info.weights:
        raise UserError(f"{model} has no torchvision weights {source!r}; use one of {list(info.weights) or 'none'}, "
                        f"a .pth file or a workdir")
    from resnext_jax.convert import ConversionError, from_torchvision
    try:
        variables = from_torchvision(model, source)
    except ImportError as error:
        raise UserError(f"reading torchvision weights needs torch ({error}); pip install -e '.[torch]'") from error
    except ConversionError as error:  # its first line sums up (and may name the right model); then every key
        summary = str(error).splitlines()[0]
        raise UserError(f"{source} does not fit {model}: {summary} (--verbose lists every key)") from error
    except UserError:  # the converter's own one-line errors (unreadable file, failed download) name the fix
        raise
    except Exception as error:
        if is_file:
            raise UserError(f"cannot read {source} as a torch state_dict ({type(error).__name__}: {error}); pass "
                            f"a file saved with torch.save(model.state_dict(), path)") from error
        if isinstance(error, RuntimeError):  # the download failed; the message names the URL and the fix
            raise UserError(str(error)) from error
        raise
    resize = {"IMAGENET1K_V1": info.resize_v1, "IMAGENET1K_V2": info.resize_v2}.get(tag) or \
        info.resize_v2 or info.resize_v1 or info.eval_size
    num_classes = int(variables["params"]["fc"]["kernel"].shape[-1])
    preprocessing = Preprocessing(resize_size=resize, crop_size=info.eval_size, mean=info.mean, std=info.std,
                                  class_names=default_class_names(num_classes))
    module = create_model(model, num_classes=num_classes)
    return LoadedModel(name=model, module=module, variables=jax.device_put(variables), preprocessing=preprocessing,
                       source={"kind": "torchvision", "path": os.path.abspath(source) if is_file else None,
                               "which": None, "weights": tag, "step": None},
                       config=None, model_kwargs={"num_classes": num_classes})


# ---------------------------------------------------------------------------------------------------------------
# timm weights


def _is_timm(source: str, model: str | None) -> bool:
    """timm's weights: a timm weight tag as the source or the model, a .safetensors file, or a timm-only name."""
    from resnext_jax.models.pretrained import is_pretrained_tag
    if is_pretrained_tag(source) or is_pretrained_tag(model) or source.endswith(".safetensors"):
        return True
    return model in list_models(source="timm") and model not in list_models(source="torchvision")


def _load_timm(source: str, model: str | None) -> LoadedModel:
    from resnext_jax.models.pretrained import is_pretrained_tag, pretrained_config
    tag = source if is_pretrained_tag(source) else model if is_pretrained_tag(model) else None
    name = model.split(".", 1)[0] if model else tag.split(".", 1)[0] if tag else None
    if name is None:
        raise UserError(f"{source} is a weights file; pass the model it belongs to, e.g. --model regnety_032, or "
                        f"the timm weight tag it was saved from (--model regnety_032.ra_in1k) for its exact preset")
    _check_model_name(name, "--model")  # a tag of another model as the source: from_timm names its model
    from resnext_jax.convert import ConversionError, from_timm
    try:
        variables = from_timm(name, source)
    except ImportError as error:
        raise UserError(f"reading timm weights needs torch and safetensors ({error}); pip install -e '.[torch]'") \
            from error
    except ConversionError as error:  # its first line sums up and names the fix; then every key
        raise UserError(f"{source} does not fit {name}: {str(error).splitlines()[0]} (--verbose lists every key)") \
            from error
    if tag:
        cfg = pretrained_config(tag)
        resize, crop, interpolation, mean, std = cfg.resize_size, cfg.crop_size, cfg.interpolation, cfg.mean, cfg.std
    else:  # the name's default weights' preset (a timm-only name), else torchvision's
        info = model_info(name)
        crop, interpolation, mean, std = info.eval_size, info.interpolation, info.mean, info.std
        resize = int(crop / info.crop_pct) if info.crop_pct else info.resize_v2 or info.resize_v1 or crop
    num_classes = int(variables["params"]["fc"]["kernel"].shape[-1]) if "fc" in variables["params"] else 0
    preprocessing = Preprocessing(resize_size=resize, crop_size=crop, mean=tuple(mean), std=tuple(std),
                                  class_names=default_class_names(num_classes), interpolation=interpolation)
    module = create_model(name, num_classes=num_classes)
    is_file = os.path.exists(source)
    return LoadedModel(name=name, module=module, variables=jax.device_put(variables), preprocessing=preprocessing,
                       source={"kind": "timm", "path": os.path.abspath(source) if is_file else None, "which": None,
                               "weights": tag, "step": None},
                       config=None, model_kwargs={"num_classes": num_classes})


# ---------------------------------------------------------------------------------------------------------------
# training workdirs


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
    """The kept step with the highest logged eval top-1 (the earliest on a tie, as the training loop counts best)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    best, best_top1 = None, -1.0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a torn last line (a crash mid-write) holds no finished record
                continue
            if record.get("split") == "eval" and record.get("step") in steps and record["top1"] > best_top1:
                best, best_top1 = record["step"], record["top1"]
    return best


def _pick_step(workdir: str, which: str | int) -> tuple[int, bool]:
    directory = os.path.join(workdir, "checkpoints")
    complete, incomplete = _complete_steps(directory)
    if isinstance(which, (int, np.integer)) or str(which).isdigit():
        step = int(which)
        if step in incomplete:
            raise UserError(f"checkpoint step {step} in {directory} is incomplete (no commit marker: a save was cut "
                            f"off); pick one of the complete steps {complete or 'none'}")
        if step not in complete:
            raise UserError(f"{directory} has no checkpoint step {step}; complete steps: {complete or 'none'}")
        return step, False
    if which not in WHICH:
        raise UserError(f"which={which!r}; use one of {', '.join(WHICH)} or a step number")
    if not complete:
        extra = f" (steps {incomplete} are incomplete: their saves were cut off)" if incomplete else ""
        raise UserError(f"{workdir} has no complete checkpoint{extra}; train it first "
                        f"(python -m train --config ... --workdir {workdir}) or pass another workdir")
    for step in incomplete:
        if step > complete[-1]:
            log.warning("checkpoint step %d in %s is incomplete (no commit marker); using step %d", step,
                        directory, complete[-1])
    if which == "best":
        best = _best_step(workdir, complete)
        return (best if best is not None else complete[-1]), False
    return complete[-1], which == "ema"


def _restore(path: str, keys: tuple[str, ...]) -> dict:
    """Restores only `keys` of a saved TrainState (no optimizer state) onto the default device."""
    import orbax.checkpoint as ocp

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
        target = {key: jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                                    saved[key]) for key in keys}
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    except UserError:
        raise
    except Exception as error:  # tensorstore/asyncio errors run to hundreds of lines; the cause is the damage
        raise UserError(f"cannot read checkpoint {path} ({type(error).__name__}: {str(error).splitlines()[0]}); "
                        f"it is damaged: pick another step (--which latest, or a step number)") from error
    finally:
        absl_logger.setLevel(level)


def _verify(step_dir: str, restored: dict, step: int) -> None:
    """Checks the restored arrays against the CRC-32s the trainer saved beside them (`checksums`, see
    `resnext_jax.training.checkpoint.checksums`), so that a bit-flipped or truncated step is never used."""
    path = os.path.join(step_dir, "checksums", "metadata")
    if not os.path.exists(path):
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
        raise UserError(f"checkpoint step {step} in {os.path.dirname(step_dir)} fails its checksums ({len(wrong)} "
                        f"arrays, e.g. {wrong[0]}): it is damaged; pick another step ({others or 'none left'})")


def _load_workdir(workdir: str, model: str | None, which: str | int) -> LoadedModel:
    workdir = os.path.abspath(workdir)
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise UserError(f"{workdir} is a directory without config.json, so not a training workdir; pass a "
                        f"workdir of `python -m train`, a .pth file or a torchvision weight tag")
    config = _read_json(config_path)
    name = config.get("model")
    _check_model_name(name, f"{config_path}")
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
    crop = int(config.get("image_size") or model_info(name).eval_size)
    mean, std = _normalization(config, name, info, info_error)
    names = default_class_names(kwargs["num_classes"], info, config.get("dataset"))
    preprocessing = Preprocessing(resize_size=int(config.get("eval_resize_size") or crop), crop_size=crop,
                                  mean=mean, std=std, class_names=names)
    source = {"kind": "workdir", "path": workdir, "step": step, "which": str(which),
              "weights": "ema" if ema else "raw"}
    return LoadedModel(name=name, module=module, variables=variables, preprocessing=preprocessing, source=source,
                       config=config, model_kwargs=kwargs)


def _dataset_info(config: dict):
    """The run's DatasetInfo (class names, normalization), or (None, error) if the data is not on this machine."""
    from resnext_jax.data import dataset_info
    try:
        return dataset_info(config.get("dataset"), config.get("data_dir") or None), None
    except Exception as error:  # noqa: BLE001  not prepared here: the statistics may still be known
        log.info("dataset %s is not readable here (%s)", config.get("dataset"), error)
        return None, error


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
        raise UserError(f"the run normalized images with the statistics of dataset {config.get('dataset')!r}, "
                        f"which cannot be read here ({info_error}); prepare it, or set data_dir in config.json")
    return tuple(spec.mean), tuple(spec.std)
