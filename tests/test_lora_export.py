"""The exported student LoRA loads in diffusers with every module at its trained scale, in both
the diffusers file and the kohya/ComfyUI file (true alpha), and carries the TDM metadata."""

import json

import pytest
import torch

import peft  # noqa: F401
import diffusers

from safetensors import safe_open  # noqa: E402
from test_trainer import make_trainer  # noqa: E402

from tdm_train.lora.export import COMFYUI_FILE, DIFFUSERS_FILE, kohya_state_dict, save_student_lora  # noqa: E402
from tdm_train.lora.metadata import recommend  # noqa: E402
from tdm_train.tiny_models import tiny_sdxl_unet  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    trainer = make_trainer(out / "run", max_train_steps=2, lora_rank=4, lora_alpha=2)  # scale 0.5: alpha matters
    trainer.train(progress=False)
    state = trainer.student_state()
    paths = save_student_lora(out, "sdxl", state, 4, 2.0, ("to_q", "to_k", "to_v", "to_out.0"),
                              trainer.objective.timesteps, trainer.step)
    return trainer, state, paths


def _student_output(trainer, x, t, cond):
    with torch.no_grad(), trainer.roles.use("student"):
        return trainer.backend.x0(x, t, cond)


def _reference_inputs(trainer):
    gen = torch.Generator().manual_seed(3)
    cond = {k: v[:2] for k, v in trainer.conditions.items()}
    return torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([899, 449]), cond


def _plain_unet_output(trainer, unet, x, t, cond):
    with torch.no_grad():
        eps = unet(x, t, encoder_hidden_states=cond["prompt_embeds"],
                   added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}).sample
    return trainer.backend.schedule.x0_from_output(eps, x, t)


@pytest.mark.parametrize("which", [DIFFUSERS_FILE, COMFYUI_FILE])
def test_files_load_in_diffusers_with_every_module_at_the_trained_scale(trained, which):
    trainer, state, (diffusers_path, comfy_path) = trained
    path = diffusers_path if which == DIFFUSERS_FILE else comfy_path
    torch.manual_seed(0)
    unet = tiny_sdxl_unet()  # the same base weights as the trainer's (same seed)
    # what StableDiffusionXLPipeline.load_lora_weights does, without building a whole pipeline
    pipeline = diffusers.StableDiffusionXLPipeline
    lora_state, alphas, metadata = pipeline.lora_state_dict(str(path), return_lora_metadata=True)
    pipeline.load_lora_into_unet(lora_state, alphas, unet=unet, adapter_name="tdm", metadata=metadata)
    loaded = {name for name, module in unet.named_modules() if hasattr(module, "lora_A") and "tdm" in module.lora_A}
    assert len(loaded) == len(state) // 2  # zero dropped modules
    x, t, cond = _reference_inputs(trainer)
    torch.testing.assert_close(_plain_unet_output(trainer, unet, x, t, cond), _student_output(trainer, x, t, cond),
                               rtol=1e-4, atol=1e-5)


def test_kohya_names_and_true_alpha(trained):
    _, state, (_, comfy_path) = trained
    with safe_open(str(comfy_path), "pt") as f:
        keys = set(f.keys())
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
        meta = f.metadata()
    assert alphas == {2.0}  # not the rank (diffusers' converter writes 4 here)
    assert all(k.startswith("lora_unet_") and k.rsplit(".", 2)[-2] in ("lora_down", "lora_up", "alpha")
               or k.endswith(".alpha") for k in keys)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert len(keys) == 3 * len(state) // 2
    assert meta["ss_network_alpha"] == "2.0" and meta["ss_network_dim"] == "4"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert json.loads(meta["tdm.timesteps"]) == [899, 674, 449, 224] and meta["tdm.recommended_cfg"] == "1.0"
    recommendation = recommend(meta, "anything.safetensors")  # what the TDM LoRA Loader reads
    assert recommendation.strength == 1.0 and recommendation.sampling["timesteps"] == [899, 674, 449, 224]


def test_diffusers_file_has_adapter_metadata_and_a_model_card(trained):
    _, _, (diffusers_path, _) = trained
    with safe_open(str(diffusers_path), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        assert all(k.startswith("unet.") for k in f.keys())
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 2.0
    card = (diffusers_path.parent / "README.md").read_text()
    assert "899, 674, 449, 224" in card and "guidance scale **1**" in card


def test_the_trainers_export_records_the_teacher_guidance_it_trained_with(trained, tmp_path):
    trainer, state, (diffusers_path, _) = trained
    run = trainer.output_dir  # trainer.train() wrote its own files there, trained at guidance 2 (make_trainer)
    for name in (DIFFUSERS_FILE, COMFYUI_FILE):
        with safe_open(str(run / name), "pt") as f:
            assert f.metadata()["tdm.training_cfg"] == "2", name
    card = (run / "README.md").read_text()
    assert "Teacher guidance (CFG) distilled into it: 2 (chosen for this run; the sdxl default is 8)." in card
    # without a training guidance (a converted file) nothing is claimed
    with safe_open(str(diffusers_path), "pt") as f:
        assert "tdm.training_cfg" not in f.metadata()
    assert "Teacher guidance" not in (diffusers_path.parent / "README.md").read_text()
    save_student_lora(tmp_path, "pixart", {"a.lora_A.weight": torch.zeros(2, 4), "a.lora_B.weight": torch.zeros(4, 2)},
                      2, 2, ("a",), [899], 1, training_cfg=4.5)
    assert "distilled into it: 4.5 (the pixart default, the official TDM demo" in (tmp_path / "README.md").read_text()


def test_non_finite_lora_is_never_saved(tmp_path):
    state = {"a.lora_A.weight": torch.full((2, 4), float("nan")), "a.lora_B.weight": torch.zeros(4, 2)}
    with pytest.raises(ValueError, match="non-finite"):
        save_student_lora(tmp_path, "sdxl", state, 2, 2, ("a",), [899], 1)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="missing lora_A or lora_B"):
        kohya_state_dict({"a.lora_A.weight": torch.zeros(1)}, 1.0)
