"""`python -m tdm_train` on StableDiffusion3Pipeline folders (tiny SD3 and SD3.5, built offline):
detection, the prompt encoding of diffusers' own pipeline, the flow grid from pure noise, each
teacher's guidance, and a LoRA that diffusers' StableDiffusion3Pipeline loads with every key and
whose metadata records the trained sigmas."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tdm_train.tiny_models import save_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("sd3")
    return {variant: save_tiny_pipeline(base / variant, variant) for variant in ("sd3", "sd3.5")}


def test_prompts_are_encoded_as_stable_diffusion_3_pipeline_encodes_them(folders):
    from diffusers import StableDiffusion3Pipeline

    from tdm_train.training.teachers import encode_prompts

    prompts = ["a red cat on the moon", "an astronaut riding a horse in the city at night"]
    conditions, negative = encode_prompts(folders["sd3.5"], "sd3", prompts)
    pipe = StableDiffusion3Pipeline.from_pretrained(folders["sd3.5"])
    embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
        prompts, None, None, do_classifier_free_guidance=True, max_sequence_length=256)
    assert conditions["prompt_embeds"].shape == (2, 77 + 256, 48)  # CLIP tokens, then T5's (1e-4: batches differ)
    torch.testing.assert_close(conditions["prompt_embeds"], embeds, atol=1e-4, rtol=0)
    torch.testing.assert_close(conditions["pooled_prompt_embeds"], pooled, atol=1e-4, rtol=0)
    # the pipeline's own negative (no negative prompt given) is the empty prompt's encoding
    torch.testing.assert_close(negative["prompt_embeds"][0], negative_embeds[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(negative["pooled_prompt_embeds"][0], negative_pooled[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant, guidance", [("sd3.5", 4.5), ("sd3", 7.0)])
def test_a_stable_diffusion_3_folder_trains_a_lora_diffusers_loads(folders, tmp_path, variant, guidance):
    from diffusers import StableDiffusion3Pipeline

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red horse on the moon\n")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "tdm_train", "--pretrained_teacher_model", str(folders[variant]),
                          "--prompts", str(prompts), "--output_dir", str(out), "--resolution", "64",
                          "--max_train_steps", "2", "--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-3"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "TDM sd3: 2 steps, 0 skipped" in run.stdout
    with safe_open(str(out / "tdm_lora_comfyui.safetensors"), "pt") as f:
        meta = f.metadata()
        alphas = {float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")}
    assert json.loads(meta["tdm.timesteps"]) == [999, 749, 499, 249]  # from pure noise on the flow table
    sampling = json.loads(meta["tdm.sampling"])
    assert sampling["flow_shift"] == 3.0 and sampling["sigmas"] == [1.0, 0.9, 0.75, 0.5]
    assert meta["tdm.training_cfg"] == f"{guidance:g}" and alphas == {8.0}
    card = (out / "README.md").read_text()
    assert f"{guidance:g} (the {variant} default" in card

    pipe = StableDiffusion3Pipeline.from_pretrained(folders[variant])
    gen = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 8, 8, generator=gen),
                  encoder_hidden_states=torch.randn(1, 7, 48, generator=gen),
                  pooled_projections=torch.randn(1, 32, generator=gen), timestep=torch.tensor([750.0]))
    with torch.no_grad():
        before = pipe.transformer(**inputs).sample
        pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
        after = pipe.transformer(**inputs).sample
    lora_keys = [k for k in pipe.transformer.state_dict() if "lora_" in k]
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert len(lora_keys) == len(list(f.keys()))  # every key of the file became an adapter weight
    assert (after - before).abs().max() > 1e-5  # the trained LoRA is not zero


def test_an_sd3_folder_with_a_ddpm_scheduler_or_no_t5_is_refused(folders, tmp_path):
    import shutil

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    broken = tmp_path / "no_t5"
    shutil.copytree(folders["sd3.5"], broken)
    shutil.rmtree(broken / "text_encoder_3")
    run = subprocess.run([sys.executable, "-m", "tdm_train", "--pretrained_teacher_model", str(broken), "--prompts",
                          str(prompts), "--output_dir", str(tmp_path / "never"), "--resolution", "64"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 3 and "text_encoder_3" in run.stderr
    odd = tmp_path / "odd"
    run = subprocess.run([sys.executable, "-m", "tdm_train", "--pretrained_teacher_model", str(folders["sd3"]),
                          "--prompts", str(prompts), "--output_dir", str(odd), "--resolution", "72"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "--resolution 72: a positive multiple of 16" in run.stderr
