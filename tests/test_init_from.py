"""`config.init_from` naming a training workdir: pre-train on digits, fine-tune on a prepared 3-class folder."""

import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from prepared_data import make_folder
from test_training import tiny_config

from resnext_jax.errors import UserError
from resnext_jax.inference import load_model
from resnext_jax.training import read_metrics, train_and_evaluate
from resnext_jax.training.init_from import split_source


@pytest.fixture(scope="module")
def source_run(tiny_run):
    """A quick-start-style run on digits (conftest's shared run: the tiny one-stage ResNeXt, 2 epochs, 10 classes)."""
    return tiny_run


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A prepared 3-class folder (circle, square, triangle): (dataset name, data_dir)."""
    from resnext_jax.data.prepare.folder import prepare_folder

    root = tmp_path_factory.mktemp("shapes")
    make_folder(str(root / "images"), per_class=40)
    prepare_folder(str(root / "images"), "shapes", data_dir=str(root / "data"), val_fraction=0.25, quiet=True)
    return "shapes", str(root / "data")


def _flat(variables):
    return traverse_util.flatten_dict(dict(variables))


def test_split_source_reads_which_after_a_colon(tmp_path):
    run = str(tmp_path)
    assert split_source(run) == (run, "best")
    assert split_source(run + ":latest") == (run, "latest")
    assert split_source(run + ":ema") == (run, "ema")
    assert split_source(run + ":120") == (run, "120")
    assert split_source("IMAGENET1K_V2") == ("IMAGENET1K_V2", "best")
    assert split_source(run + ":nonsense") == (run + ":nonsense", "best")  # not a run: left to the converter


@pytest.mark.slow  # a pre-training run and a fine-tuning run
def test_finetune_from_a_workdir_keeps_the_backbone_and_sizes_a_new_head(source_run, shapes, tmp_path, capsys):
    """Frozen backbone (backbone_lr_mult=0, freeze_bn): every backbone array must come out bit-identical to the
    source's latest checkpoint, the head must be 3 classes wide and trained, and the run must beat chance."""
    name, data_dir = shapes
    source = load_model(source_run, which="latest")
    config = tiny_config(
        dataset=name,
        data_dir=data_dir,
        init_from=source_run + ":latest",
        backbone_lr_mult=0.0,
        freeze_bn=True,
        learning_rate=3e-2,
        warmup_epochs=0,
        num_epochs=12,
        batch_size=30,
        eval_batch_size=30,
        log_every_steps=3,
        write_report=True,
    )
    workdir = str(tmp_path / "finetune")
    summary = train_and_evaluate(config, workdir)
    assert summary["best_top1"] >= 0.8, summary  # chance is 1/3
    out = capsys.readouterr()
    assert f"initialized from {source_run} step {source.source['step']} (latest, trained on digits)" in out.err + (
        out.out
    )
    assert "new head fc" in out.err + out.out and "-> 3 classes for shapes (the run's had 10)" in out.err + out.out

    recorded = json.load(open(os.path.join(workdir, "config.json")))["init_from_source"]
    assert recorded == {
        "kind": "workdir",
        "workdir": source_run,
        "which": "latest",
        "step": source.source["step"],
        "weights": "raw",
        "model": "resnext50_32x4d",
        "dataset": "digits",
        "num_classes": 10,
        "head": "new",
    }
    report = open(os.path.join(workdir, "report", "report.md")).read()
    assert f"Initialized from {source_run} step {source.source['step']} (latest, raw weights, trained on digits" in (
        report
    )

    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    state = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(steps[-1]), "state"))
    trained = _flat({"params": state["params"], "batch_stats": state["batch_stats"]})
    reference = _flat(source.variables)
    assert {k for k in trained if k[1] != "fc"} == {k for k in reference if k[1] != "fc"}
    for key, value in reference.items():
        if key[1] == "fc":
            continue
        np.testing.assert_array_equal(trained[key], value, err_msg="/".join(key))
    assert trained[("params", "fc", "kernel")].shape == (reference[("params", "fc", "kernel")].shape[0], 3)
    assert trained[("params", "fc", "bias")].shape == (3,)
    evals = [r for r in read_metrics(workdir) if r["split"] == "eval"]
    assert evals[-1]["top1"] >= 0.8


@pytest.mark.slow  # uses the pre-training run
def test_a_source_of_another_architecture_is_refused_with_the_fix(source_run, shapes, tmp_path):
    name, data_dir = shapes
    config = tiny_config(dataset=name, data_dir=data_dir, init_from=source_run)
    config.model_kwargs.num_filters = 16  # the source has 8
    with pytest.raises(UserError, match=r"do not fit this config's resnext50_32x4d .*set --config.model and"):
        train_and_evaluate(config, str(tmp_path / "wrong"))
    assert not os.path.exists(tmp_path / "wrong")  # a refused start leaves no workdir


def test_the_download_hint_gives_the_command_line_form(monkeypatch):
    """Offline, a torchvision tag fails in one line that says how to pass the downloaded file on each command."""
    import torchvision

    from resnext_jax.convert import from_torchvision
    from resnext_jax.convert.sources import WeightsDownloadError

    weights = torchvision.models.ResNeXt50_32X4D_Weights.IMAGENET1K_V2

    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(type(weights), "get_state_dict", offline)
    with pytest.raises(WeightsDownloadError) as error:
        from_torchvision("resnext50_32x4d", "IMAGENET1K_V2")
    message = str(error.value)
    assert "\n" not in message
    assert "--config.init_from=/path/resnext50_32x4d-1a0047aa.pth" in message
    assert "python -m resnext_jax.predict /path/resnext50_32x4d-1a0047aa.pth --model resnext50_32x4d IMAGES" in message


def test_finetune_folder_scratch_mode_trains_from_random_init():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "finetune_folder", os.path.join(os.path.dirname(__file__), "..", "configs", "finetune_folder.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    finetune, scratch = module.get_config(), module.get_config("scratch")
    assert (finetune.init_from, finetune.backbone_lr_mult, finetune.normalize) == ("IMAGENET1K_V2", 0.1, "model")
    assert (scratch.init_from, scratch.backbone_lr_mult, scratch.normalize) == ("", 1.0, "dataset")
    assert {k: v for k, v in scratch.items() if k not in ("init_from", "backbone_lr_mult", "normalize")} == {
        k: v for k, v in finetune.items() if k not in ("init_from", "backbone_lr_mult", "normalize")
    }
    with pytest.raises(ValueError, match=r"finetune_folder.py:nope: use configs/finetune_folder.py or :scratch"):
        module.get_config("nope")


@pytest.mark.slow  # uses the pre-training run
def test_a_rerun_loads_the_source_step_it_recorded_even_after_the_source_moved_on(source_run, tmp_path, caplog):
    """The source's `latest` is step 44; a run whose config.json recorded step 22 of the same source and selection
    (its first start, before the source trained on) loads step 22 again and records it unchanged."""
    import jax

    from resnext_jax.training.init_from import initial_variables
    from resnext_jax.training.loop import build_model

    config = tiny_config(init_from=source_run + ":latest")
    model = build_model(config, 3)
    workdir = tmp_path / "finetune"
    workdir.mkdir()
    record = {"kind": "workdir", "workdir": source_run, "which": "latest", "step": 22}
    (workdir / "config.json").write_text(json.dumps({"init_from_source": record}))
    variables, source, _ = initial_variables(config, model, 3, jax.random.PRNGKey(0), str(workdir))
    assert source["step"] == 22 and load_model(source_run, which="latest").source["step"] == 44
    expected = _flat(load_model(source_run, which=22).variables)
    for key, value in _flat(variables).items():
        if key[1] != "fc":
            np.testing.assert_array_equal(value, expected[key], err_msg="/".join(key))

    # A recorded step the source no longer keeps: a warning, then the selection as asked.
    (workdir / "config.json").write_text(json.dumps({"init_from_source": {**record, "step": 7}}))
    _, source, _ = initial_variables(config, model, 3, jax.random.PRNGKey(0), str(workdir))
    assert source["step"] == 44
    assert any("the recorded source step 7 of" in r.getMessage() for r in caplog.records)
    # Another selection (best) is not pinned by a record of latest.
    _, source, _ = initial_variables(tiny_config(init_from=source_run), model, 3, jax.random.PRNGKey(0), str(workdir))
    assert source["which"] == "best"
