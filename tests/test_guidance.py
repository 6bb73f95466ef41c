"""The teacher guidance TDM trains with when the user sets none: the backbone's recipe
(tdm_train/recipes.py) reaches TDMConfig.guidance_scale through the CLI's checks, an
explicit value (1.0 included) wins in flags and config files, and the demos keep their own.
Checked through check_args, which loads no model (tiny pipeline folders: it checks them whole)."""

import json

import pytest

from tdm_train.cli import parse_args
from tdm_train.training.arguments import tdm_config
from tdm_train.recipes import RECOMMENDED_GUIDANCE, describe_guidance, resolve_guidance
from tdm_train.training.run import check_args

PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "pixart": "PixArtAlphaPipeline", "cogvideox": "CogVideoXPipeline"}
# the values and their sources are in recipes.py: the official demo for PixArt-alpha, the paper for
# SDXL, our choice (CogVideoX-2B's own sampling guidance) for CogVideoX
EXPECTED = {"sdxl": 8.0, "pixart": 4.5, "cogvideox": 6.0}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tdm_train.tiny_models import save_tiny_pipeline

    root = tmp_path_factory.mktemp("teachers")
    out = {backbone: save_tiny_pipeline(root / backbone, backbone) for backbone in PIPELINES}
    (root / "prompts.txt").write_text("a cat\na dog\n")
    return out


def _guidance(folder, *flags) -> float:
    args = parse_args(["--pretrained_teacher_model", str(folder), "--prompts", str(folder.parent / "prompts.txt"),
                       "--output_dir", str(folder.parent / "never"), *map(str, flags)])
    _, _, config = check_args(args)
    return config.tdm.guidance_scale


@pytest.mark.parametrize("backbone", list(PIPELINES))
def test_cli_default_is_the_backbones_recipe(folders, backbone):
    assert parse_args([]).real_guidance_scale is None  # "the backbone's preset", not a number
    assert _guidance(folders[backbone]) == EXPECTED[backbone]
    assert RECOMMENDED_GUIDANCE[backbone].scale == EXPECTED[backbone]


def test_forced_backbone_takes_its_own_recipe(folders, tmp_path):
    # a folder whose model_index.json names a pipeline of its own: --backbone says what it is, and its
    # recipe comes with it (a forced backbone that contradicts a known pipeline class is refused)
    import shutil

    custom = tmp_path / "custom"
    shutil.copytree(folders["pixart"], custom)
    (custom / "model_index.json").write_text(json.dumps({"_class_name": "MyPixArtPipeline"}))
    (custom.parent / "prompts.txt").write_text("a cat\n")
    assert _guidance(custom, "--backbone", "pixart") == EXPECTED["pixart"]
    with pytest.raises(ValueError, match="says StableDiffusionXLPipeline"):
        _guidance(folders["sdxl"], "--backbone", "pixart")


@pytest.mark.parametrize("backbone", list(PIPELINES))
def test_an_explicit_value_wins_even_1(folders, backbone):
    assert _guidance(folders[backbone], "--real_guidance_scale", "1.0") == 1.0
    assert _guidance(folders[backbone], "--real_guidance_scale", "2.5") == 2.5


def test_config_files_set_the_guidance_and_flags_beat_them(folders, tmp_path):
    folder = folders["sdxl"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    toml = tmp_path / "tdm.toml"
    toml.write_text(f'pretrained_teacher_model = "{folder}"\nprompts = "{prompts}"\nreal_guidance_scale = 1.0\n'
                    f'output_dir = "{tmp_path / "never"}"\n')
    assert check_args(parse_args(["--config", str(toml)]))[2].tdm.guidance_scale == 1.0
    assert check_args(parse_args(["--config", str(toml), "--real_guidance_scale", "3"]))[2].tdm.guidance_scale == 3.0
    yaml = tmp_path / "tdm.yaml"
    yaml.write_text(f"pretrained_teacher_model: {folder}\nprompts: {prompts}\noutput_dir: {tmp_path / 'never'}\n")  # no guidance: the recipe
    assert check_args(parse_args(["--config", str(yaml)]))[2].tdm.guidance_scale == EXPECTED["sdxl"]
    as_text = tmp_path / "tdm.json"
    as_text.write_text(json.dumps({"pretrained_teacher_model": str(folder), "prompts": str(prompts),
                                   "real_guidance_scale": "1", "output_dir": str(tmp_path / "never")}))
    assert check_args(parse_args(["--config", str(as_text)]))[2].tdm.guidance_scale == 1.0


def test_the_demos_keep_their_own_guidance():
    from tdm_train.demos.digits.distill import DigitsDemoConfig

    assert tdm_config(parse_args(["--demo", "gmm"])).guidance_scale == 1.0  # the exact toy teacher has no condition
    assert DigitsDemoConfig().guidance_scale == 2.0


def test_resolution_and_its_description():
    assert resolve_guidance(None, "sd15") == (3.5, "sd15 default: " + RECOMMENDED_GUIDANCE["sd15"].source)
    assert resolve_guidance(1.0, "sdxl") == (1.0, "set explicitly")
    with pytest.raises(ValueError, match="no recommended training guidance for 'flux'"):
        resolve_guidance(None, "flux")
    assert describe_guidance(4.5, "pixart").startswith("4.5 (the pixart default, the official TDM demo")
    assert describe_guidance(1.0, "sdxl") == "1 (no CFG: the student learns the unguided teacher)"
    assert describe_guidance(5.0, "sdxl") == "5 (chosen for this run; the sdxl default is 8)"
    assert describe_guidance(2.0, "digits") == "2 (chosen for this run)"


def test_resuming_at_another_guidance_than_the_checkpoints_warns(tmp_path, caplog):
    """A run started under another default (e.g. 1 before the recipes) is not continued silently."""
    import logging

    from test_trainer import make_trainer

    from tdm_train.distill import TDMConfig

    make_trainer(tmp_path, max_train_steps=1, train_batch_size=1, tdm=TDMConfig(guidance_scale=1.0)).train(
        progress=False)
    with caplog.at_level(logging.WARNING, logger="tdm_train"):
        make_trainer(tmp_path, tdm=TDMConfig(guidance_scale=1.0)).load_checkpoint(tmp_path / "checkpoint-1")
        assert "teacher guidance" not in caplog.text
        make_trainer(tmp_path, tdm=TDMConfig(guidance_scale=8.0)).load_checkpoint(tmp_path / "checkpoint-1")
    assert "was trained with teacher guidance 1; this run continues it with 8" in caplog.text
