"""Bad input to the model API, the converter and the summary CLI: one clear error that names the fix (issue 24).

Each case asserts the exception type and that the message names the offending field or key and what to do. The
converter cases use real torchvision state_dicts (random init, no download).
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torch_reference import randomized_torchvision, torch_logits

import resnext_jax
from resnext_jax.convert import (
    CheckpointNotFoundError,
    ConversionError,
    from_torchvision,
    to_torchvision,
)
from resnext_jax.errors import InputError, UserError, run_cli
from resnext_jax.summary import main as summary_main
from resnext_jax.summary import summarize


def _is_input_error(error) -> bool:
    return isinstance(error, InputError) and isinstance(error, UserError) and isinstance(error, ValueError)


# ---------------------------------------------------------------------------------------------- model fields

IMPOSSIBLE_FIELDS = [
    ("resnext50_32x4d", "cardinality", 0, "integer >= 1"),
    ("resnet50", "bottleneck_width", 0, "integer >= 1"),
    ("resnet18", "num_classes", -1, "integer >= 0"),
    ("resnet50", "num_filters", -64, "integer >= 1"),
    ("resnet50", "stage_sizes", (), "non-empty list of integers >= 1"),
    ("resnet50", "stage_sizes", (3, 0, 6, 3), "non-empty list of integers >= 1"),
    ("resnet50", "drop_path_rate", 1.0, "[0, 1)"),
    ("resnet50", "drop_path_rate", -0.1, "[0, 1)"),
    ("resnet50", "dropout_rate", 1.5, "[0, 1)"),
    ("resnet50", "dropout_rate", float("nan"), "[0, 1)"),
    ("resnet50", "se_ratio", -0.25, "number >= 0"),
    ("resnet50", "norm", "layer", "'batch', 'group'"),
    ("resnet50", "norm_groups", 0, "integer >= 1"),
    ("resnet50", "activation", "swish", "'gelu', 'relu', 'silu'"),
    ("resnet50", "conv_impl", "fast", "'xla'"),
    ("resnet50", "dtype", jnp.int32, "floating dtype"),
    ("resnet50", "small_stem", "False", "True or False"),
    ("regnet_x_400mf", "w_m", 1.0, "> 1"),
    ("regnet_x_400mf", "group_width", 0, "integer >= 1"),
    ("regnet_y_400mf", "depth", 0, "integer >= 1"),
    ("regnet_y_400mf", "stem_width", 0, "integer >= 1"),
]


@pytest.mark.parametrize(
    "name, field, value, allowed", IMPOSSIBLE_FIELDS, ids=[f"{f}={v!r}" for _, f, v, _ in IMPOSSIBLE_FIELDS]
)
def test_impossible_model_field_is_named(name, field, value, allowed):
    with pytest.raises(InputError) as info:
        resnext_jax.create_model(name, **{field: value})
    assert _is_input_error(info.value)
    message = str(info.value)
    assert f"{field}={value!r}" in message and allowed in message, message
    assert "\n" not in message


def test_all_impossible_fields_are_named_at_once():
    with pytest.raises(InputError) as info:
        resnext_jax.create_model("resnext50_32x4d", cardinality=0, bottleneck_width=0, num_classes=-1)
    for fragment in ("cardinality=0", "bottleneck_width=0", "num_classes=-1"):
        assert fragment in str(info.value)


def test_basic_blocks_refuse_resnext_fields():
    # torchvision refuses groups != 1 for BasicBlock; ours used to fail only inside the first trace.
    with pytest.raises(InputError, match=r"cardinality=4 .*basic blocks.* use 1, or a bottleneck model"):
        resnext_jax.create_model("resnet18", cardinality=4)


def test_zero_channel_bottleneck_is_named():
    with pytest.raises(
        InputError, match=r"bottleneck_width=4 with num_filters=8 .*num_filters \* bottleneck_width >= 64"
    ):
        resnext_jax.create_model("resnext50_32x4d", num_filters=8, bottleneck_width=4)


def test_boundary_values_still_build():
    """The checks refuse only what cannot work: each boundary value here builds and runs."""
    model = resnext_jax.create_model(
        "resnext50_32x4d",
        stage_sizes=[1, 1],
        num_filters=16,
        bottleneck_width=4,
        cardinality=1,
        num_classes=0,
        drop_path_rate=0.0,
        dropout_rate=0.99,
        se_ratio=1.0,
        norm="group",
        norm_groups=1,
        dtype="bfloat16",
        small_stem=1,
    )
    out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))[0])
    assert out.shape == (1, 128)


def test_unknown_model_is_input_error_with_closest():
    with pytest.raises(InputError, match="closest: resnext50_32x4d") as info:
        resnext_jax.create_model("resnext50_32x4")
    assert _is_input_error(info.value)
    with pytest.raises(InputError, match="list_models"):
        resnext_jax.model_info(None)


def test_unknown_field_is_input_error():
    with pytest.raises(InputError, match="drop_path_rate"):
        resnext_jax.create_model("resnet18", drop_path=0.1)


# ---------------------------------------------------------------------------------------------- summary CLI


def test_summary_resolution_zero_is_one_line(capsys):
    assert run_cli(summary_main, ["resnet18", "--resolution", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: resolution=0 is not allowed"), err
    assert ">= 1" in err[0] and "224" in err[0]


@pytest.mark.parametrize(
    "argv, fragment", [(["resnet18x"], "closest: resnet18"), (["resnet18", "--num-classes", "-1"], "num_classes=-1")]
)
def test_summary_bad_model_is_one_line(capsys, argv, fragment):
    assert run_cli(summary_main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err


def test_summary_module_exits_2_without_traceback():
    """`python -m resnext_jax.summary` itself (the __main__ wiring), not only `main`."""
    result = subprocess.run(
        [sys.executable, "-m", "resnext_jax.summary", "resnet18", "--resolution", "0"],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error: resolution=0 is not allowed" in result.stderr


def test_smallest_resolution_the_message_promises_runs():
    # Every stride-2 layer pads, so a 1x1 image runs (each stage 1x1): the message says ">= 1 runs".
    summary = summarize("resnet18", 1)
    assert [row["out_size"] for row in summary["stages"]] == ["1x1"] * 4


# ---------------------------------------------------------------------------------------------- converter


@pytest.fixture(scope="module")
def resnet18_state():
    return {k: v.clone() for k, v in randomized_torchvision("resnet18").state_dict().items()}


@pytest.fixture(scope="module")
def resnet50_variables():
    torch.manual_seed(0)
    return from_torchvision("resnet50", torchvision.models.resnet50(weights=None).state_dict())


@pytest.fixture(scope="module")
def resnet18_variables(resnet18_state):
    return from_torchvision("resnet18", resnet18_state)


def _lines(error, prefix: str) -> list[str]:
    return [line for line in str(error).splitlines() if line.strip().startswith(prefix)]


def test_export_of_another_builders_variables_is_refused(resnet50_variables):
    with pytest.raises(ConversionError) as info:
        to_torchvision("resnet18", resnet50_variables)
    assert _is_input_error(info.value)
    first = str(info.value).splitlines()[0]
    assert "they look like resnet50's: to_torchvision('resnet50', variables)" in first, first
    assert "unexpected key: params/layer1_0/conv3/kernel (torchvision layer1.0.conv3.weight (256, 64, 1, 1))" in str(
        info.value
    )
    # resnet50's 1x1 conv1 where resnet18 has a 3x3: named with both shapes.
    assert (
        "wrong shape: params/layer1_0/conv1/kernel (layer1.0.conv1.weight): variables (1, 1, 64, 64), resnet18 "
        "wants (3, 3, 64, 64) (torchvision (64, 64, 3, 3))"
    ) in str(info.value)


def test_export_of_empty_variables_names_every_missing_key(resnet18_state):
    with pytest.raises(ConversionError) as info:
        to_torchvision("resnet18", {"params": {}})
    missing = _lines(info.value, "missing key:")
    expected = [k for k in resnet18_state if not k.endswith("num_batches_tracked")]
    assert len(missing) == len(expected)
    assert "missing key: layer4.1.bn2.running_var (512,)" in str(info.value)
    assert "there are no weights at all" in str(info.value).splitlines()[0]


def test_export_of_params_alone_names_the_fix(resnet18_variables):
    with pytest.raises(ConversionError, match=r"needs the variables dict \{'params': ..., 'batch_stats': ...\}"):
        to_torchvision("resnet18", resnet18_variables["params"])


def test_export_names_missing_and_misshaped_variables_once(resnet18_variables):
    params = {k: dict(v) for k, v in resnet18_variables["params"].items()}
    del params["layer2_1"]["bn2"]
    params["fc"] = {"kernel": jnp.zeros((512, 7)), "bias": jnp.zeros(8)}
    with pytest.raises(ConversionError) as info:
        to_torchvision("resnet18", {**resnet18_variables, "params": params})
    message = str(info.value)
    assert "missing key: layer2.1.bn2.weight (128,)" in message and "missing key: layer2.1.bn2.bias" in message
    assert "wrong shape: params/fc/bias (fc.bias): variables (8,), resnet18 wants (7,)" in message
    assert message.count("fc.bias") == 1, message


def test_half_precision_checkpoint_loads(resnet18_state, resnet18_variables):
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in resnet18_state.items()}
    variables = from_torchvision("resnet18", half)
    expected = resnet18_state["conv1.weight"].to(torch.bfloat16).float().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(variables["params"]["conv1"]["kernel"], expected)
    assert variables["params"]["conv1"]["kernel"].dtype == jnp.float32


def test_export_casts_half_precision_to_float32(resnet18_variables, resnet18_state):
    half = jax.tree.map(lambda leaf: leaf.astype(jnp.bfloat16), resnet18_variables)
    state = to_torchvision("resnet18", half)
    assert state["conv1.weight"].dtype == torch.float32
    expected = resnet18_state["conv1.weight"].to(torch.bfloat16).float()
    assert torch.equal(state["conv1.weight"], expected)


def test_export_with_another_option_is_refused():
    variables = jax.eval_shape(
        lambda: resnext_jax.create_model("resnet18", norm="group").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    )
    with pytest.raises(ConversionError, match="no torchvision counterpart.*layer1_0/bn1/gn/scale"):
        to_torchvision("resnet18", variables)


def test_headless_model_round_trips_through_an_identity_head(resnet18_state):
    """num_classes=0 is "no head" both ways: import drops the head, export loads into torchvision with
    `fc = nn.Identity()`, and the pooled features agree with that torchvision model."""
    variables = from_torchvision("resnet18", resnet18_state, num_classes=0, reinit_head=True)
    assert "fc" not in variables["params"]
    assert from_torchvision("resnet18", resnet18_state, num_classes=0).keys() == variables.keys()
    reference = torchvision.models.resnet18(weights=None).eval()
    reference.load_state_dict(resnet18_state)
    reference.fc = torch.nn.Identity()
    with pytest.raises(ConversionError, match="no head 'fc'; pass num_classes=0 to export a state_dict without it"):
        to_torchvision("resnet18", variables)
    reference.load_state_dict(to_torchvision("resnet18", variables, num_classes=0), strict=True)
    images = np.random.default_rng(0).standard_normal((2, 64, 64, 3), dtype=np.float32)
    features = resnext_jax.create_model("resnet18", num_classes=0).apply(variables, jnp.asarray(images))
    np.testing.assert_allclose(np.asarray(features), torch_logits(reference, images), rtol=0, atol=1e-4)


def test_headless_checkpoint_needs_reinit_for_a_head(resnet18_state):
    headless = {k: v for k, v in resnet18_state.items() if not k.startswith("fc.")}
    with pytest.raises(
        ConversionError,
        match=r"no head \(fc.weight\) but num_classes=10; pass num_classes=0 for "
        r"features only, or reinit_head=True",
    ):
        from_torchvision("resnet18", headless, num_classes=10)
    with pytest.raises(ConversionError, match=r"no head \(fc.weight\) but num_classes=1000; pass num_classes=0"):
        from_torchvision("resnet18", headless)
    assert "fc" not in from_torchvision("resnet18", headless, num_classes=0)["params"]
    variables = from_torchvision("resnet18", headless, num_classes=10, reinit_head=True)
    assert variables["params"]["fc"]["kernel"].shape == (512, 10)


def test_negative_num_classes_is_named(resnet18_state):
    with pytest.raises(InputError, match=r"num_classes=-1 is not allowed; use an integer >= 0"):
        from_torchvision("resnet18", resnet18_state, num_classes=-1, reinit_head=True)


def test_wrong_shape_is_listed_once_with_both_shapes(resnet18_state):
    state = dict(resnet18_state)
    state["layer3.0.conv1.weight"] = torch.zeros(256, 128, 1, 1)
    with pytest.raises(ConversionError) as info:
        from_torchvision("resnet18", state)
    message = str(info.value)
    assert "wrong shape: layer3.0.conv1.weight: checkpoint (256, 128, 1, 1), resnet18 wants (256, 128, 3, 3)" in message
    assert message.count("layer3.0.conv1.weight") == 1, message
    assert not _lines(info.value, "missing key:")


def test_import_of_another_builders_checkpoint_names_it(resnet18_state):
    with pytest.raises(ConversionError, match=r"they look like resnet18's: from_torchvision\('resnet18', ...\)"):
        from_torchvision("resnet34", resnet18_state)


def test_regnet_layout_is_recognized():
    torch.manual_seed(0)
    state = torchvision.models.regnet_x_400mf(weights=None).state_dict()
    with pytest.raises(ConversionError, match=r"they look like regnet_x_400mf's"):
        from_torchvision("regnet_y_400mf", state)


@pytest.mark.parametrize("suffix", ["", ".pth", ".bin"])
def test_missing_path_is_not_taken_for_a_tag(tmp_path, suffix):
    path = str(tmp_path / f"weights{suffix}")
    with pytest.raises(CheckpointNotFoundError) as info:
        from_torchvision("resnet18", path)
    assert isinstance(info.value, FileNotFoundError) and _is_input_error(info.value)
    message = str(info.value)
    assert f"{path} does not exist" in message and "known tags: IMAGENET1K_V1, DEFAULT" in message, message


def test_unknown_tag_lists_the_known_tags():
    with pytest.raises(InputError, match="known tags: IMAGENET1K_V1, DEFAULT, or pass the path"):
        from_torchvision("resnet18", "IMAGENET1K_V7")


def test_directory_and_unreadable_file_are_named(tmp_path):
    with pytest.raises(InputError, match="is a directory; pass the .pth/.pt checkpoint file inside it"):
        from_torchvision("resnet18", tmp_path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"cannot read .*garbage.pth as a torch checkpoint .*torch.save"):
        from_torchvision("resnet18", str(garbage))


@pytest.mark.parametrize(
    "wrap",
    ["model", "state_dict", "model_state_dict", "module."],
    ids=["model", "state_dict", "model_state_dict", "data_parallel"],
)
def test_wrapped_state_dict_loads_the_same_from_memory_and_file(resnet18_state, resnet18_variables, tmp_path, wrap):
    if wrap.endswith("."):
        wrapped = {wrap + k: v for k, v in resnet18_state.items()}
    else:
        wrapped = {wrap: resnet18_state, "epoch": 3, "optimizer": {"lr": 0.1}}
    path = tmp_path / "checkpoint.pt"
    torch.save(wrapped, path)
    for source in (wrapped, str(path)):
        variables = from_torchvision("resnet18", source)
        for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(resnet18_variables), strict=True):
            np.testing.assert_array_equal(a, b)


def test_unknown_wrapper_names_the_entry(resnet18_state):
    with pytest.raises(ConversionError, match=r"not a state_dict: \['weights'\].*checkpoint\['weights'\]"):
        from_torchvision("resnet18", {"weights": resnet18_state, "epoch": 3})


# The model's input check (resnext_jax/models/checks.py): a wrong layout or an empty training batch is one InputError.


@pytest.fixture(scope="module")
def small_resnet():
    model = resnext_jax.create_model("resnet18", stage_sizes=(1, 1, 1, 1), num_classes=4)
    return model, model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)


@pytest.mark.parametrize(
    "shape,fix",
    [
        ((2, 3, 32, 32), r"channels-first \(NCHW\): pass x.transpose\(0, 2, 3, 1\)"),
        ((2, 32, 32, 1), r"grayscale .* jnp.repeat\(x, 3, axis=-1\)"),
        ((32, 32, 3), r"4-D NHWC .* x\[None\]"),
        ((2, 32, 32, 4), r"with 3 channels; got shape \(2, 32, 32, 4\)"),
    ],
)
def test_a_wrong_image_layout_is_one_error_naming_the_fix(small_resnet, shape, fix):
    model, variables = small_resnet
    with pytest.raises(InputError, match=fix):
        model.apply(variables, jnp.zeros(shape), train=False)


def test_init_refuses_channels_first_images():
    model = resnext_jax.create_model("regnet_x_400mf")
    with pytest.raises(InputError, match="NCHW"):
        model.init(jax.random.key(0), jnp.zeros((1, 3, 64, 64)), train=False)


def test_an_empty_training_batch_is_refused_before_it_poisons_batch_norm(small_resnet):
    model, variables = small_resnet
    with pytest.raises(InputError, match="empty batch .* NaN"):
        model.apply(variables, jnp.zeros((0, 32, 32, 3)), train=True, mutable=["batch_stats"])
    assert model.apply(variables, jnp.zeros((0, 32, 32, 3)), train=False).shape == (0, 4)  # inference: fine


# Issue 29: batch norm on one value per channel, and the command-line errors that were tracebacks.


def test_batch_norm_on_one_value_per_channel_in_training_is_refused_as_torch_does():
    """resnet18 at 32 px with a batch of one: the last feature map is 1x1, so each BatchNorm there sees one value
    per channel. It used to return all-zero logits and no gradient to the backbone; torch raises."""
    model = torchvision.models.resnet18(num_classes=4).train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        model(torch.zeros(1, 3, 32, 32))
    ours = resnext_jax.create_model("resnet18", num_classes=4)
    variables = ours.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    with pytest.raises(InputError, match=r"1 value per channel \(input \(1, 1, 1, 512\)\).*batch of 2 or more"):
        ours.apply(variables, jnp.ones((1, 32, 32, 3)), train=True, mutable=["batch_stats"])
    logits, _ = ours.apply(variables, jnp.ones((2, 32, 32, 3)), train=True, mutable=["batch_stats"])
    assert logits.shape == (2, 4)  # two values per channel are fine, as in torch
    assert ours.apply(variables, jnp.ones((1, 32, 32, 3)), train=False).shape == (1, 4)


def _cli_error(main, argv, capsys) -> tuple[int, str]:
    try:
        code = run_cli(main, argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_predict_max_pixels_must_be_positive(capsys):
    from resnext_jax.predict import main as predict_main

    code, line = _cli_error(predict_main, ["runs/x", "a.jpg", "--max-pixels", "-1"], capsys)
    assert code == 2 and "--max-pixels -1 must be a positive pixel count" in line


def test_evaluate_batch_zero_and_an_unwritable_out_are_one_line(tmp_path, capsys):
    from resnext_jax.evaluate import main as evaluate_main

    code, line = _cli_error(evaluate_main, ["runs/x", "--batch", "0"], capsys)
    assert code == 2 and "--batch 0 must be a positive integer" in line
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, line = _cli_error(evaluate_main, ["runs/x", "--out", str(blocker / "report")], capsys)
    assert code == 2 and line.startswith("error: --out ") and "cannot be written" in line
    code, line = _cli_error(evaluate_main, ["runs/x", "--out", str(blocker)], capsys)
    assert code == 2 and "is a file; give a folder path" in line


def test_export_out_as_a_directory_or_unwritable_is_one_line(tmp_path, capsys):
    from resnext_jax.export.__main__ import main as export_main

    code, line = _cli_error(export_main, ["runs/x", "--format", "stablehlo", "--out", str(tmp_path)], capsys)
    assert code == 2 and f"is a directory; give a file path, e.g. {tmp_path / 'model.mlir'}" in line
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = str(blocker / "model.mlir")
    code, line = _cli_error(export_main, ["runs/x", "--format", "stablehlo", "--out", out], capsys)
    assert code == 2 and "cannot be written" in line and "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_from_timm_with_one_missing_tensor_names_the_missing_key_not_another_builder(name):
    """It said the weights "look like resnet18d or seresnet18" (resnet50 -> resnet50_gn, resnext50_32x4d ->
    resnext50d_32x4d): builders with the same stages. from_torchvision said the right thing, and still does."""
    import timm

    from resnext_jax.convert import from_timm

    state = timm.create_model(name, pretrained=False).state_dict()
    del state["layer1.0.conv1.weight"]
    with pytest.raises(ConversionError) as raised:
        from_timm(name, state)
    first = str(raised.value).splitlines()[0]
    assert "1 missing" in first and "look like" not in first, first
    assert "missing key: layer1.0.conv1.weight" in str(raised.value)
    torch_state = getattr(torchvision.models, name)().state_dict()
    del torch_state["layer1.0.conv1.weight"]
    with pytest.raises(ConversionError) as raised:
        from_torchvision(name, torch_state)
    assert "look like" not in str(raised.value).splitlines()[0]
