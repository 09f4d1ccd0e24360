"""The typed network options (``occscene_pl.options``): conversion, validation, checkpoints with either form.

Checkpoints written before the option classes hold plain dicts (possibly partial: an overlay used to replace a whole
group) in ``hyper_parameters``; ``predict --ckpt_path`` and the judge still read them.
"""

from __future__ import annotations

import inspect
import io
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from occscene_pl.cli import main
from occscene_pl.judge import load_judge
from occscene_pl.module import OccSceneModule
from occscene_pl.options import (
    AlignerOptions,
    GeneratorOptions,
    PerceiverOptions,
    TextEncoderOptions,
    coerce_options,
)
from tests.conftest import REPO, TINY

TINY_MODEL: dict[str, Any] = yaml.safe_load(Path(TINY).read_text())["model"]
GRID = (8, 8, 4)


def test_defaults_mirror_the_network_constructors() -> None:
    """Same fields and defaults as the keyword arguments of each network (minus what the module supplies)."""
    from occscene_pl.models import MambaDualAlignment, OccupancyPerceiver, SceneGenerator, TextEncoder

    cases = [
        (GeneratorOptions, SceneGenerator, set()),
        (TextEncoderOptions, TextEncoder, set()),
        (AlignerOptions, MambaDualAlignment, {"num_classes", "residual_spec", "latent_channels"}),
        (PerceiverOptions, OccupancyPerceiver, {"num_classes", "grid_size"}),
    ]
    for options, network, supplied in cases:
        parameters = {k: p.default for k, p in inspect.signature(network).parameters.items() if k not in supplied}
        expected = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in parameters.items()}
        assert options().kwargs() == expected, options.__name__


def test_coerce_accepts_instances_dicts_and_none() -> None:
    options = AlignerOptions(depth_bins=8)
    assert coerce_options(AlignerOptions, options) is options
    assert coerce_options(AlignerOptions, None) == AlignerOptions()
    from_dict = coerce_options(AlignerOptions, {"depth_bins": 8, "depth_range": [2, 52], "patch_size": [4, 2, 2]})
    assert from_dict.depth_range == (2.0, 52.0) and from_dict.patch_size == (4, 2, 2)
    with pytest.raises(ValueError, match=r"^model\.aligner: unknown option 'depht_bins'; expected one of embed_dim"):
        coerce_options(AlignerOptions, {"depht_bins": 8})
    with pytest.raises(TypeError, match=r"^model\.perceiver must be a PerceiverOptions or a dict"):
        coerce_options(PerceiverOptions, 3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "kwargs", "message"),
    [
        (AlignerOptions, {"depth_range": (5.0, 1.0)}, r"model\.aligner\.depth_range must be \[near, far\]"),
        (AlignerOptions, {"deform_kernel_size": 2}, r"model\.aligner\.deform_kernel_size must be odd"),
        (PerceiverOptions, {"feature_dim": 6}, r"model\.perceiver\.feature_dim must be a positive multiple of 4"),
        (PerceiverOptions, {"project_scale": 3}, r"model\.perceiver\.project_scale must be a power of two"),
        (TextEncoderOptions, {"padding": "left"}, r"model\.text_encoder\.padding must be eot or zero"),
        (GeneratorOptions, {"sampler": "plms"}, r"model\.generator\.sampler must be one of ddim"),
        (GeneratorOptions, {"pretrained": "sd", "unet": {}}, r"model\.generator: give either pretrained"),
    ],
)
def test_invalid_values_name_the_option(options: Any, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        options(**kwargs)


def test_module_accepts_dicts_and_saves_the_classes() -> None:
    module = OccSceneModule(
        num_classes=12,
        grid_size=GRID,
        mode="generation",
        generator=TINY_MODEL["generator"],
        text_encoder=TINY_MODEL["text_encoder"],
        aligner=TINY_MODEL["aligner"],
        perceiver=TINY_MODEL["perceiver"],
    )
    assert isinstance(module.hparams["aligner"], AlignerOptions)
    assert module.aligner is not None and module.aligner.depth_bins == TINY_MODEL["aligner"]["depth_bins"]
    with pytest.raises(ValueError, match=r"model\.generator is required in joint mode"):
        OccSceneModule(num_classes=12, grid_size=GRID, perceiver=TINY_MODEL["perceiver"])


@pytest.mark.parametrize("form", ["dict", "options"])
def test_judge_reads_perceiver_settings_of_either_form(form: str, tmp_path: Path) -> None:
    """A perception checkpoint's ``hyper_parameters.perceiver`` as an old dict or a PerceiverOptions, weights-only."""
    stage1 = OccSceneModule(num_classes=12, grid_size=GRID, mode="perception", perceiver=TINY_MODEL["perceiver"])
    hparams = dict(stage1.hparams)
    if form == "dict":
        hparams["perceiver"] = dict(TINY_MODEL["perceiver"])
    else:
        assert isinstance(hparams["perceiver"], PerceiverOptions)
    path = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": stage1.state_dict(), "hyper_parameters": hparams}, path)
    judge = load_judge(path, 12, GRID)
    own = stage1.perceiver.state_dict()
    assert all(torch.equal(value, own[key]) for key, value in judge.state_dict().items())


def test_options_load_weights_only() -> None:
    buffer = io.BytesIO()
    saved = [
        GeneratorOptions(unet={"block_out_channels": [8]}),
        TextEncoderOptions(),
        AlignerOptions(),
        PerceiverOptions(),
    ]
    torch.save(saved, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == saved


def test_predict_from_a_checkpoint_with_old_dict_groups(nyuv2_root: Path, tmp_path: Path) -> None:
    """A checkpoint whose network groups are the partial dicts older versions saved still predicts."""
    common = [
        "--config",
        str(REPO / "configs" / "nyuv2.yaml"),
        "--config",
        TINY,
        f"--trainer.default_root_dir={tmp_path}",
        f"--data.root={nyuv2_root}",
        "--data.grid_size=[8, 8, 4]",
        "--data.image_size=[32, 48]",
    ]
    main(["fit", *common, "--trainer.max_steps=1", "--trainer.limit_val_batches=0"])
    (last,) = sorted(tmp_path.rglob("last.ckpt"))
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    for group in ("generator", "text_encoder", "aligner", "perceiver"):
        value = hparams[group]
        assert isinstance(value, dict | GeneratorOptions | TextEncoderOptions | AlignerOptions | PerceiverOptions)
        hparams[group] = dict(TINY_MODEL[group])  # what an overlay replacing the whole group used to save
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    out = tmp_path / "predictions"  # the default GenerationWriter's folder under trainer.default_root_dir
    main(
        [
            "predict",
            *common,
            f"--ckpt_path={old}",
            "--model.sampling.num_inference_steps=1",
        ]
    )
    assert sorted(out.rglob("occupancy.npz")), f"predict wrote nothing under {out}"
