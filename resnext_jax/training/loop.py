"""The training loop: `train_and_evaluate(config, workdir)` trains, evaluates, logs and checkpoints one run.

Rerunning it with the same config and workdir resumes from the latest checkpoint (params, optimizer state,
step, RNG and data-iterator position), so an interrupted and resumed run logs the same metrics as an
uninterrupted one. All hyperparameters come from the config (see `resnext_jax.training.config`).
"""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import resnext_jax
from resnext_jax import data, parallel
from resnext_jax.errors import UserError, disk_error
from resnext_jax.precision import bf16_cpu_note
from resnext_jax.run_files import read_metrics
from resnext_jax.training import distributed, preflight
from resnext_jax.training import workdir as workdir_lib
from resnext_jax.training.checkpoint import Checkpointer
from resnext_jax.training.config import config_to_dict, validate_config
from resnext_jax.training.guards import StopRequested, check_finite, disk_error_in
from resnext_jax.training.init_from import initial_variables
from resnext_jax.training.metrics_log import MetricsLogger, Progress
from resnext_jax.training.optim import create_learning_rate_schedule, create_optimizer
from resnext_jax.training.step import (
    AXIS,
    create_train_state,
    init_variables,
    make_dead_relu_step,
    make_eval_step,
    make_train_step,
)
from resnext_jax.training.trackers import Trackers, tracker_names


def build_model(config: ml_collections.ConfigDict, num_classes: int):
    """The configured model: `config.model` with `model_kwargs`, the dataset's classes and the compute dtype.

    BatchNorm syncs its statistics over the mesh axis, since the steps run under shard_map.
    """
    kwargs = dict(config.model_kwargs.to_dict())
    kwargs.setdefault("num_classes", num_classes)
    if "stage_sizes" in kwargs:
        kwargs["stage_sizes"] = tuple(kwargs["stage_sizes"])
    return resnext_jax.create_model(
        config.model, dtype=jnp.bfloat16 if config.half_precision else jnp.float32, bn_axis_name=AXIS, **kwargs
    )


def describe_model(config: ml_collections.ConfigDict, params) -> str:
    """`config.model` with the `model_kwargs` that change it and the parameter count, for the run's first log line.

    e.g. "resnext50_32x4d (cardinality=8, ..., stage_sizes=(1, 1); 0.03M params)": the quick start's two-stage model
    is not the 25M-parameter builder its name alone would suggest.
    """
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
    overrides = ", ".join(
        f"{key}={tuple(value) if isinstance(value, list) else value!r}"
        for key, value in sorted(config.model_kwargs.to_dict().items())
    )
    return f"{config.model} ({overrides + '; ' if overrides else ''}{count / 1e6:.2f}M params)"


def evaluate(eval_step, variables, eval_loader, mesh) -> dict:
    """Loss, top-1 and top-5 over the whole eval split (padding rows masked out)."""
    totals = None
    for batch in eval_loader:
        sums = eval_step(variables, parallel.global_batch(batch, mesh))
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = max(float(totals["count"]), 1.0)
    return {
        "loss": float(totals["loss"]) / count,
        "top1": float(totals["top1"]) / count,
        "top5": float(totals["top5"]) / count,
        "count": int(totals["count"]),
    }


def _mean_metrics(pending: list[dict]) -> dict:
    fetched = jax.device_get(pending)
    return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None, allow_changes: bool = False
) -> dict:
    """Trains `config` in `workdir`, resuming from its latest checkpoint that verifies; returns a summary.

    Args:
      config: a validated schema from `resnext_jax.training.config.default_config()`.
      workdir: holds config.json, environment.json, metrics.jsonl, tensorboard/ and checkpoints/. One run at a time
        writes to it (`workdir.WorkdirLock`).
      stop_at_step: stop (after saving) once this step is reached, as a preemption would; for tests.
      allow_changes: resume a run whose config differs from the saved one in `config.CHANGEABLE_FIELDS` (e.g. a
        lower learning rate after a divergence); the change is recorded in `config_changes.jsonl`.

    Returns:
      {'step', 'epoch', 'train': the train metrics averaged over the last logged window of steps (at most
       `log_every_steps`; 'train_steps' is its [first, last] step; the epoch line's "train (epoch mean)" averages a
       whole epoch instead), 'eval': last eval metrics (over the whole eval split), 'best_top1', 'best_step',
       'stopped_early': bool}.

    Raises:
      UserError (ConfigError, TrainingDiverged, ...) for problems whose message names the fix, including a full
      disk or a read-only workdir.
    """
    validate_config(config)
    distributed.maybe_initialize_distributed(config.peer_timeout_s)
    workdir = os.path.abspath(workdir)
    primary = jax.process_index() == 0
    created = not os.path.isdir(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        lock = workdir_lib.WorkdirLock(workdir) if primary else None
        if lock is not None:
            lock.acquire()
    except OSError as error:
        raise disk_error(error, workdir, "the workdir") from error
    try:
        with distributed.peer_watch_scope():  # a lost peer ends this process in one line, within peer_timeout_s
            return _train_and_evaluate(config, workdir, primary, stop_at_step, allow_changes)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 (Orbax and TensorBoard wrap the OSError of a full or read-only disk)
        cause = disk_error_in(error, workdir)
        if cause is not None:
            raise cause from error
        raise
    finally:
        if lock is not None:
            lock.release()
            workdir_lib.remove_if_unstarted(workdir, created)


def _train_and_evaluate(config, workdir: str, primary: bool, stop_at_step, allow_changes: bool) -> dict:
    config_dict = config_to_dict(config)
    changes = workdir_lib.check_compatible(workdir, config_dict, allow_changes)

    mesh = parallel.create_mesh()
    local_batch = parallel.check_batch_size(config.batch_size, mesh.size, "batch_size", config.grad_accum_steps)
    local_eval_batch = parallel.check_batch_size(config.eval_batch_size, mesh.size, "eval_batch_size")
    data_dir = config.data_dir or None
    info = data.dataset_info(config.dataset, data_dir)
    dataset_identity, dataset_change = workdir_lib.check_dataset(workdir, config.dataset, data_dir, allow_changes)
    changes.update(dataset_change)
    loader_args = dict(process_index=jax.process_index(), process_count=jax.process_count())
    if config.normalize == "model":  # pretrained weights expect the normalization they were trained with
        preset = resnext_jax.model_info(config.model)
        loader_args.update(mean=preset.mean, std=preset.std)
    train_loader = data.create_train_loader(
        config.dataset,
        data_dir=data_dir,
        batch_size=local_batch,
        image_size=config.image_size,
        transform=config.transform,
        augment=config.augment or None,
        seed=config.seed,
        worker_count=config.worker_count,
        prefetch=config.prefetch,
        **loader_args,
    )
    eval_loader = data.create_eval_loader(
        config.dataset,
        data_dir=data_dir,
        batch_size=local_eval_batch,
        image_size=config.image_size,
        resize_size=config.eval_resize_size or None,
        worker_count=config.worker_count,
        **loader_args,
    )
    steps_per_epoch = train_loader.steps_per_epoch
    total_steps = int(math.ceil(config.num_epochs * steps_per_epoch))
    num_epochs = int(math.ceil(config.num_epochs))

    num_classes = info.num_classes
    model = build_model(config, num_classes)
    preflight.check_image_size_fits(model, config.image_size, local_batch)
    schedule = create_learning_rate_schedule(config, steps_per_epoch)
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    variables, init_source, init_line = initial_variables(config, model, num_classes, init_rng, workdir)
    if variables is None:
        variables = init_variables(model, init_rng, config.image_size)
    if init_source is not None:  # config.json names the run or file the first weights came from
        config_dict["init_from_source"] = init_source
    tx = create_optimizer(config, schedule, variables["params"])
    state = create_train_state(tx, variables, state_rng, config.ema_decay > 0)
    distributed.barrier("state-ready")  # before the first cross-process collective (see `barrier`)
    state = jax.device_put(state, parallel.replicated(mesh))

    # The config is valid, the model built and the data found: only now does the workdir record this run, so a
    # failed start (a typo, a missing dataset) never ties the workdir to a config that cannot run.
    if primary:
        workdir_lib.write_run_records(workdir, config_dict)
        workdir_lib.record_dataset(workdir, dataset_identity)
    checkpointer = Checkpointer(workdir, config.keep_checkpoints, primary=primary)
    data_iterator = iter(train_loader)
    trackers = Trackers(tracker_names(config.trackers), workdir, config_dict, enabled=primary)
    logger = MetricsLogger(
        workdir, enabled=primary, tensorboard="tensorboard" in tracker_names(config.trackers), trackers=trackers
    )
    best_top1, best_step = -1.0, None
    restored = checkpointer.restore(state, data_iterator, timeout_s=10 * config.peer_timeout_s)
    if restored is not None:
        state = restored[1]
    start_step = int(state.step)
    topology = distributed.topology_change(checkpointer.saved_topology, config.batch_size) if restored else None
    if topology:  # Orbax restored the replicated state onto this mesh; the data order follows from the step
        changes = {**changes, "topology": topology}
    # Records past the restart point were written after its checkpoint (or before any, for step 0): drop them,
    # so that the resumed run logs each step once.
    logger.truncate_after(start_step)
    if primary and os.path.exists(logger.path):
        for record in read_metrics(workdir):
            if record["split"] == "eval" and record["top1"] > best_top1:
                best_top1, best_step = record["top1"], record["step"]
    if primary:
        workdir_lib.record_changes(workdir, start_step, changes)

    train_step = make_train_step(
        model,
        tx,
        schedule,
        mesh,
        num_classes=num_classes,
        label_smoothing=config.label_smoothing,
        mixup_alpha=config.mixup_alpha,
        cutmix_alpha=config.cutmix_alpha,
        grad_accum_steps=config.grad_accum_steps,
        ema_decay=config.ema_decay,
        freeze_bn=config.freeze_bn,
        stage_diagnostics=config.stage_diagnostics,
    )
    dead_relu = make_dead_relu_step(model, mesh) if config.stage_diagnostics else None
    eval_step = make_eval_step(model, mesh)
    progress = Progress(
        total_steps,
        start_step,
        config.batch_size,
        primary,
        config.progress_bar,
        show_top5=num_classes > 5,
        log_path=os.path.join(workdir, "train.log"),
    )
    progress.write(
        f"{describe_model(config, state.params)} on {config.dataset}: {mesh.size} device(s), "
        f"{jax.process_count()} process(es), global batch {config.batch_size}, "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps"
        + (f", resuming at step {start_step}" if start_step else "")
    )
    if topology:
        progress.write(distributed.describe_topology_change(*topology, local_batch))
    if init_line and not start_step:
        progress.write(init_line)
    if note := bf16_cpu_note(model.dtype, "training"):
        progress.write(note)

    summary = {
        "step": start_step,
        "epoch": start_step // steps_per_epoch,
        "train": None,
        "train_steps": None,
        "eval": None,
        "stopped_early": False,
    }
    pending, epoch_metrics, epoch_start = [], [], time.perf_counter()
    host_times = distributed.HostTimes()  # the slowest and fastest process, at each log step
    with StopRequested() as stop:
        for step in range(start_step + 1, total_steps + 1):
            batch = parallel.global_batch(host_times.next(data_iterator), mesh)
            state, metrics = train_step(state, batch)
            if step == start_step + 1 and primary:  # the step is traced now: record which CPU kernels it uses
                workdir_lib.record_native_kernels(workdir)
            pending.append(metrics)
            epoch_end = step % steps_per_epoch == 0 or step == total_steps
            if step % config.log_every_steps == 0 or epoch_end:
                train_metrics = {**_mean_metrics(pending), **host_times.gather()}
                check_finite(train_metrics, step, checkpointer, config.learning_rate)
                if dead_relu is not None:
                    fractions = dead_relu({"params": state.params, "batch_stats": state.batch_stats}, batch)
                    train_metrics.update({k: float(v) for k, v in jax.device_get(fractions).items()})
                epoch_metrics.append((len(pending), train_metrics))
                summary["train_steps"] = [step - len(pending) + 1, step]  # what summary["train"] averages
                pending = []
                logger.write(step, "train", {"epoch": step / steps_per_epoch, **train_metrics})
                summary["train"] = train_metrics
            progress.update(step, summary["train"] if step % config.log_every_steps == 0 or epoch_end else None)

            eval_metrics = None
            if epoch_end:
                epoch = math.ceil(step / steps_per_epoch)
                evals = {}
                if epoch % config.eval_every_epochs == 0 or step == total_steps:
                    evals["eval"] = evaluate(
                        eval_step, {"params": state.params, "batch_stats": state.batch_stats}, eval_loader, mesh
                    )
                    if config.ema_decay > 0:
                        evals["eval_ema"] = evaluate(
                            eval_step,
                            {"params": state.ema_params, "batch_stats": state.ema_batch_stats},
                            eval_loader,
                            mesh,
                        )
                    eval_metrics = evals["eval"]
                    if eval_metrics["top1"] > best_top1:
                        best_top1, best_step = eval_metrics["top1"], step
                    for split, metrics_ in evals.items():
                        logger.write(
                            step,
                            split,
                            {"epoch": epoch, **metrics_, **({"best_top1": best_top1} if split == "eval" else {})},
                        )
                    summary["eval"] = eval_metrics
                counts = sum(n for n, _ in epoch_metrics)
                epoch_train = {k: sum(n * m[k] for n, m in epoch_metrics) / counts for k in ("loss", "top1")}
                progress.epoch_line(epoch, num_epochs, epoch_train, time.perf_counter() - epoch_start, evals)
                epoch_metrics, epoch_start = [], time.perf_counter()
                summary["epoch"] = epoch

            sync_point = step % config.log_every_steps == 0 or epoch_end
            stopping = (stop_at_step is not None and step >= stop_at_step) or stop.should_stop(sync_point)
            if epoch_end or step % config.checkpoint_every_steps == 0 or stopping:
                if pending:  # never save a state whose loss we have not checked
                    check_finite(_mean_metrics(pending), step, checkpointer, config.learning_rate)
                checkpointer.save(step, state, data_iterator, eval_metrics, force=stopping)
            summary["step"] = step
            if stopping:
                summary["stopped_early"] = step < total_steps
                progress.write(
                    f"stopping at step {step}: checkpoint saved in {checkpointer.directory}; "
                    f"rerun the same command to resume"
                )
                break
    progress.close()
    checkpointer.wait()
    # The end line names the checkpoint `load_model(which="best")` loads: a tie may have kept a later step.
    best_top1, best_step = workdir_lib.best_kept(workdir, checkpointer.all_steps()) if primary else (None, None)
    checkpointer.close()
    summary.update(best_top1=best_top1, best_step=best_step)
    if primary and not summary["stopped_early"] and config.write_report and jax.process_count() == 1:
        from resnext_jax.inference.report import write_run_report

        report = write_run_report(workdir, which="best", speed_batch_sizes=(1, local_eval_batch), min_seconds=1.0)
        summary["report"] = os.path.join(report["report_dir"], "report.md")
        trackers.log_files(report["report_dir"])
    logger.close()  # after the report, whose files the trackers keep as artifacts
    if primary and not summary["stopped_early"]:
        report = f"; report {summary['report']}" if "report" in summary else ""
        best = "no eval recorded" if best_step is None else f"best eval top1 {best_top1:.2%} at step {best_step}"
        progress.write(f"done: step {summary['step']}, {best}; workdir {workdir}{report}")
    return summary
