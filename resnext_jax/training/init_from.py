"""`config.init_from`: where a run's first weights come from, and the record of that source.

    --config.init_from=                          random init (train from scratch)
    --config.init_from=IMAGENET1K_V2             torchvision weights (a tag, or a downloaded .pth/.pt file)
    --config.init_from=runs/pretrain             another run's best checkpoint; runs/pretrain:latest,
                                                 runs/pretrain:ema or runs/pretrain:1200 pick as load_model does

From a run, every backbone array is copied as it was saved; the classifier head `fc` is new (sized for this
run's dataset) unless `reinit_head=False` and the class counts agree. The architecture must be the run's: its
config.json names the model and model_kwargs to use. The source's identity (workdir, step, dataset) is returned
for config.json's `init_from_source` and the report.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
from flax import traverse_util

from resnext_jax.errors import UserError
from resnext_jax.models.init import init_variables
from resnext_jax.models.layout import stack_blocks, unstack_blocks

WHICH = ("best", "latest", "ema")
log = logging.getLogger("resnext_jax.training")


def split_source(init_from: str) -> tuple[str, str]:
    """(path, which) of a run source: 'runs/a' -> ('runs/a', 'best'), 'runs/a:latest' -> ('runs/a', 'latest')."""
    path = os.path.expanduser(init_from)
    if not os.path.isdir(path) and ":" in path:
        head, which = path.rsplit(":", 1)
        if os.path.isdir(head) and (which in WHICH or which.isdigit()):
            return head, which
    return path, "best"


def is_run_source(init_from: str) -> bool:
    """Whether `init_from` names a training workdir (optionally with :which), rather than torchvision weights."""
    return bool(init_from) and os.path.isdir(split_source(init_from)[0])


def initial_variables(
    config, model, num_classes: int, rng: jax.Array, workdir: str | None = None
) -> tuple[dict | None, dict | None, str]:
    """(variables, source record, one log line) for `config.init_from`; (None, None, '') means random init.

    `model` is the module this run trains (built with `num_classes` outputs); its fresh variables give the head.
    `workdir` is this run's: when it already recorded a source step (a rerun or a resume), that same step is
    loaded again, even if the source run has trained on and its `best` or `latest` moved since.
    """
    if not config.init_from:
        return None, None, ""
    scan = bool(config.model_kwargs.to_dict().get("scan_blocks", False))
    if is_run_source(config.init_from):
        return _from_run(config, model, num_classes, rng, scan, workdir)
    from resnext_jax.convert import from_torchvision

    # The layout must match the model's: stacked per stage when the config scans blocks.
    variables = from_torchvision(
        config.model,
        config.init_from,
        num_classes=num_classes,
        reinit_head=config.reinit_head,
        rng=rng,
        scan_blocks=scan,
    )
    source = {"kind": "torchvision", "path": config.init_from, "model": config.model}
    return variables, source, f"initialized from torchvision weights {config.init_from}"


def _flat(variables) -> dict:
    return traverse_util.flatten_dict(jax.tree.map(np.asarray, dict(variables)), sep="/")


def _recorded_step(workdir: str | None, path: str, which: str) -> int | None:
    """The source step this run's config.json recorded for the same source and selection, if any."""
    if not workdir or which == "ema":  # a step number would load the raw weights, not the EMA ones
        return None
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            recorded = json.load(f).get("init_from_source") or {}
    except (OSError, ValueError):
        return None
    same = recorded.get("kind") == "workdir" and recorded.get("which") == which
    if same and os.path.abspath(recorded.get("workdir", "")) == os.path.abspath(path):
        return int(recorded["step"])
    return None


def _from_run(config, model, num_classes: int, rng: jax.Array, scan: bool, workdir: str | None):
    from resnext_jax.inference.from_run import load_workdir

    path, which = split_source(config.init_from)
    step = _recorded_step(workdir, path, which)
    try:
        loaded = load_workdir(path, None, which if step is None else step)
    except UserError as error:
        if step is None:
            raise
        log.warning(
            "the recorded source step %d of %s is gone (%s); loading its %s checkpoint", step, path, error, which
        )
        loaded = load_workdir(path, None, which)
    saved = loaded.config or {}
    fresh = init_variables(model, rng, config.image_size)
    source_vars = unstack_blocks(loaded.variables)
    if scan:
        source_vars = stack_blocks(source_vars)
    source_flat, target_flat = _flat(source_vars), _flat(fresh)

    def is_head(key: str) -> bool:
        return key.split("/")[1] == "fc"

    source_classes = int(loaded.model_kwargs.get("num_classes", 0))
    new_head = config.reinit_head or source_classes != num_classes
    backbone = {key for key in target_flat if not is_head(key)}
    wrong = sorted(
        key for key in backbone if key not in source_flat or source_flat[key].shape != target_flat[key].shape
    )
    extra = sorted(key for key in source_flat if not is_head(key) and key not in target_flat)
    if wrong or extra:
        key = (wrong or extra)[0]
        shapes = f"{source_flat[key].shape if key in source_flat else 'absent'} in the run, " + (
            f"{target_flat[key].shape} here" if key in target_flat else "absent here"
        )
        kwargs = {k: v for k, v in loaded.model_kwargs.items() if k != "num_classes"}
        raise UserError(
            f"{path} holds a {loaded.name} {kwargs} whose weights do not fit this config's {config.model} "
            f"({len(wrong) + len(extra)} arrays differ, e.g. {key}: {shapes}); set --config.model and "
            f"model_kwargs to the run's (see {os.path.join(path, 'config.json')})"
        )
    merged = {key: (target_flat[key] if new_head and is_head(key) else source_flat[key]) for key in target_flat}
    variables = traverse_util.unflatten_dict(merged, sep="/")
    features = target_flat["params/fc/kernel"].shape[0] if "params/fc/kernel" in target_flat else 0
    source = {
        "kind": "workdir",
        "workdir": loaded.source["path"],
        "which": which,
        "step": loaded.source["step"],
        "weights": loaded.source["weights"],
        "model": loaded.name,
        "dataset": saved.get("dataset"),
        "num_classes": source_classes,
        "head": "new" if new_head else "kept",
    }
    head = (
        f"new head fc {features} -> {num_classes} classes for {config.dataset} (the run's had {source_classes})"
        if new_head
        else f"its head kept ({num_classes} classes)"
    )
    line = (
        f"initialized from {source['workdir']} step {source['step']} ({which}, trained on {source['dataset']}): "
        f"backbone loaded, {head}"
    )
    return variables, source, line
