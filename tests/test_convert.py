"""`python -m tdm_train.convert`: a release's positional `ema_parameters` list (the TDM SD3.5-Medium
LoRA's layout, rebuilt here on tiny SD3 / SD3.5-shaped transformers: peft LoraConfig r 32, alpha 64,
the 8 attention projections, the list in peft's parameter order) becomes LoRA files that diffusers
and our fusing load with every key, reproducing the peft model the list came from; lists for
another base or config and code-executing pickles are refused."""

import json
import re

import pytest
import torch

from tdm_train.convert import RELEASES, convert, main
from tdm_train.errors import EXIT_BAD_FILE, IncompatibleFile

RELEASE = RELEASES["tdm-sd3.5-medium"]
BASE = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
            pos_embed_max_size=16)
CONFIGS = {"sd3": BASE, "sd3.5": {**BASE, "dual_attention_layers": (0,), "qk_norm": "rms_norm"}}


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=gen),
                encoder_hidden_states=torch.randn(2, 5, 16, generator=gen),
                pooled_projections=torch.randn(2, 8, generator=gen), timestep=torch.tensor([999.0, 500.0]))


def _release(tmp_path, variant):
    """(base folder, the release-style checkpoint, the peft model whose EMA list it holds)."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    base = SD3Transformer2DModel(**CONFIGS[variant])
    base.save_pretrained(tmp_path / "base" / "transformer")
    student = SD3Transformer2DModel.from_pretrained(tmp_path / "base" / "transformer")
    inject_adapter_in_model(LoraConfig(r=RELEASE.rank, lora_alpha=RELEASE.alpha, init_lora_weights="gaussian",
                                       target_modules=list(RELEASE.targets)), student)
    trainable = [p for name, p in student.named_parameters() if "lora_" in name]
    with torch.no_grad():
        for p in trainable:  # a trained LoRA: lora_B is no longer zero
            p.normal_(0, 0.05)
    path = tmp_path / "tdm_sd3-5_lora.ckpt"
    torch.save({"decay": 0.999, "ema_parameters": [p.detach().clone() for p in trainable]}, path)
    return tmp_path / "base", path, student.eval()


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_the_converted_lora_reproduces_the_peft_model_in_diffusers_and_when_fused(tmp_path, variant):
    from diffusers import SD3Transformer2DModel
    from safetensors import safe_open

    from tdm_train.lora.merge import fuse_lora

    base, checkpoint, student = _release(tmp_path, variant)
    diffusers_file, comfy_file = convert(checkpoint, base, tmp_path / "out", RELEASE)
    with torch.no_grad():
        reference = student(**_inputs()).sample
        plain = SD3Transformer2DModel.from_pretrained(base / "transformer").eval()
        assert (plain(**_inputs()).sample - reference).abs().max() > 1e-2  # the LoRA matters
        loaded = SD3Transformer2DModel.from_pretrained(base / "transformer").eval()
        loaded.load_lora_adapter(str(tmp_path / "out"), weight_name=diffusers_file.name, prefix="transformer")
        assert torch.allclose(loaded(**_inputs()).sample, reference, atol=1e-5)  # every key, scale alpha/r = 2
        fused = SD3Transformer2DModel.from_pretrained(base / "transformer").eval()
        result = fuse_lora(fused, comfy_file)
        assert result.modules == len([n for n, _ in student.named_parameters() if "lora_A" in n])
        assert torch.allclose(fused(**_inputs()).sample, reference, atol=1e-5)  # the .alpha tensors hold 64
    with safe_open(str(comfy_file), "pt") as f:
        meta = f.metadata()
        assert float(f.get_tensor(next(k for k in f.keys() if k.endswith(".alpha")))) == 64.0
    assert meta["tdm.lora_strength"] == "1" and json.loads(meta["tdm.timesteps"]) == [999, 899, 749, 499]
    assert json.loads(meta["tdm.sampling"])["flow_shift"] == 3.0


def test_a_list_for_another_base_or_config_is_refused_with_the_counts(tmp_path):
    base, checkpoint, _ = _release(tmp_path / "sd3", "sd3")
    other, _, _ = _release(tmp_path / "sd35", "sd3.5")  # dual attention: more LoRA modules
    with pytest.raises(IncompatibleFile, match=r"tensors in 'ema_parameters', but a rank-32 LoRA .* has \d+ trainable"):
        convert(checkpoint, other, tmp_path / "out", RELEASE)
    cut = torch.load(checkpoint, weights_only=True)
    cut["ema_parameters"][3] = cut["ema_parameters"][3][:, :-1]
    torch.save(cut, tmp_path / "shapes.ckpt")
    with pytest.raises(IncompatibleFile, match="1 of .* tensors do not fit their position, the first "):
        convert(tmp_path / "shapes.ckpt", base, tmp_path / "out", RELEASE)
    assert not (tmp_path / "out").exists()


def test_the_cli_converts_and_refuses_a_pickle_that_would_run_code(tmp_path, capsys):
    import os

    base, checkpoint, _ = _release(tmp_path, "sd3")
    assert main([str(checkpoint), "--release", "tdm-sd3.5-medium", "--base", str(base), "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "tdm_lora_comfyui.safetensors").is_file()

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"ema_parameters": [Exploit()]}, tmp_path / "evil.ckpt")
    code = main([str(tmp_path / "evil.ckpt"), "--release", "tdm-sd3.5-medium", "--base", str(base), "--out",
                 str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_FILE and "not a safe format" in err and "weights_only" not in err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "b").exists()


SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
                   _class_name="SD3Transformer2DModel")  # stabilityai/stable-diffusion-3.5-medium's transformer

COMFY_KEYS = """
import json, logging, sys
files, depth = json.loads(sys.argv[1]), int(sys.argv[2])
sys.argv[1:] = ["--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import torch
from types import SimpleNamespace
import comfy.lora, comfy.model_base, comfy.utils

class SD3Shape(comfy.model_base.SD3):  # only what the key map reads: the class and the unet config
    def __init__(self):
        torch.nn.Module.__init__(self)
        self.model_config = SimpleNamespace(unet_config={"depth": depth})

key_map = comfy.lora.model_lora_keys_unet(SD3Shape(), {})
not_loaded = []
logging.getLogger().addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: not_loaded.append(r.getMessage())})())
out = {}
for path in files:
    patches = comfy.lora.load_lora(comfy.utils.load_torch_file(path), key_map)
    out[path] = {"patched": len(patches), "not_loaded": [m for m in not_loaded if "lora key not loaded" in m]}
print(json.dumps(out))
"""


@pytest.mark.skipif(not __import__("os").environ.get("COMFYUI_DIR"), reason="COMFYUI_DIR is not set: ComfyUI's "
                    "SD3 LoRA key map is read from a ComfyUI checkout")
def test_every_key_loads_in_comfyuis_sd3_key_map_tiny_and_at_sd35_medium_size(tmp_path):
    import os
    import subprocess

    from safetensors.torch import save_file

    from tdm_train.convert import lora_parameter_names

    _, checkpoint, _ = _release(tmp_path / "tiny", "sd3.5")
    _, comfy_file = convert(checkpoint, tmp_path / "tiny" / "base", tmp_path / "tiny" / "out", RELEASE)
    # the full SD3.5-Medium architecture on the meta device: the same names the converter writes, tiny tensors
    names = [name for name, _ in lora_parameter_names(SD35_MEDIUM, RELEASE.rank, RELEASE.alpha, RELEASE.targets)]
    full = {f"transformer.{name}": torch.zeros(1, 1) for name in names}
    full.update({f"transformer.{name.rsplit('.lora_A', 1)[0]}.alpha": torch.tensor(64.0) for name in names
                 if ".lora_A." in name})
    save_file(full, str(tmp_path / "sd35m_names.safetensors"))
    results = {}
    for path, depth in ((comfy_file, 2), (tmp_path / "sd35m_names.safetensors", 24)):
        done = subprocess.run([os.environ.get("COMFYUI_PYTHON", "python"), "-c", COMFY_KEYS, json.dumps([str(path)]),
                               str(depth)], cwd=os.environ["COMFYUI_DIR"], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": os.environ["COMFYUI_DIR"]})
        assert done.returncode == 0, done.stderr[-3000:]
        results.update(json.loads(done.stdout.strip().splitlines()[-1]))
    tiny, medium = results[str(comfy_file)], results[str(tmp_path / "sd35m_names.safetensors")]
    assert tiny["not_loaded"] == [] and medium["not_loaded"] == []
    # 24 blocks x (q, k, v, out, add_q, add_k, add_v) + to_add_out but in the last (context_pre_only) block,
    # + the 13 dual-attention layers x (q, k, v, out): every LoRA module found its weight
    assert medium["patched"] == len(names) // 2 == 24 * 7 + 23 + 13 * 4


COMFY_SD3 = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64,
                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=128, pooled_projection_dim=24,
                 out_channels=16, pos_embed_max_size=16)  # ComfyUI's MMDiT: hidden 64 x depth, SD3's 16 latent channels
COMFY_VARIANTS = {"sd3": COMFY_SD3, "sd3.5": {**COMFY_SD3, "dual_attention_layers": (0,), "qk_norm": "rms_norm"}}


def _comfy_release_files(folder, variant, seed):
    """A tiny diffusers transformer that ComfyUI detects as SD3, the release-style .ckpt of a trained
    LoRA on it, and the merged reference W + alpha/r B A (peft's formula, written out here)."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig, inject_adapter_in_model
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    base = SD3Transformer2DModel(**COMFY_VARIANTS[variant])
    for p in base.parameters():  # quiet weights, as a real model's
        torch.nn.init.normal_(p, std=0.02)
    plain = {k: v.detach().clone().contiguous() for k, v in base.state_dict().items()}
    inject_adapter_in_model(LoraConfig(r=RELEASE.rank, lora_alpha=RELEASE.alpha, init_lora_weights="gaussian",
                                       target_modules=list(RELEASE.targets)), base)
    trainable = [(n, p) for n, p in base.named_parameters() if "lora_" in n]
    with torch.no_grad():
        for _, p in trainable:
            p.normal_(0, 0.02)
    merged, parts = dict(plain), {}
    for name, p in trainable:
        module, kind = name.split(".lora_")
        parts.setdefault(module, {})[kind.split(".")[0]] = p.detach()
    for module, ab in parts.items():
        merged[f"{module}.weight"] = plain[f"{module}.weight"] + (RELEASE.alpha / RELEASE.rank) * ab["B"] @ ab["A"]
    tag = variant.replace(".", "")
    (folder / "loras").mkdir(parents=True, exist_ok=True)
    save_file(plain, str(folder / f"tiny_{tag}.safetensors"))
    save_file(merged, str(folder / f"tiny_{tag}_merged.safetensors"))
    torch.save({"decay": 0.999, "ema_parameters": [p.detach().clone() for _, p in trainable]},
               folder / "loras" / f"tdm_{tag}_release.ckpt")
    return {"model": str(folder / f"tiny_{tag}.safetensors"), "merged": str(folder / f"tiny_{tag}_merged.safetensors"),
            "lora": f"tdm_{tag}_release.ckpt", "modules": len(parts)}


@pytest.mark.skipif(not __import__("os").environ.get("COMFYUI_DIR"), reason="COMFYUI_DIR is not set: the TDM LoRA "
                    "Loader's on-load conversion runs on ComfyUI's own SD3 models")
def test_the_lora_loader_converts_a_positional_list_on_load_for_comfyuis_sd3_and_sd35_models(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cases = {variant: _comfy_release_files(tmp_path, variant, seed) for seed, variant in enumerate(COMFY_VARIANTS)}
    cases["sd3.5"]["wrong_lora"] = cases["sd3"]["lora"]  # a list for the SD3 layout on an SD3.5 model
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    done = subprocess.run([os.environ.get("COMFYUI_PYTHON", "python"), str(root / "tests" / "comfyui" /
                           "check_positional_lora_in_comfy.py"), str(root), str(tmp_path)],
                          cwd=os.environ["COMFYUI_DIR"], capture_output=True, text=True, timeout=400,
                          env={**os.environ, "PYTHONPATH": os.environ["COMFYUI_DIR"]})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"tdm_sd3_release.ckpt", "tdm_sd35_release.ckpt"} <= set(out["listed"])
    for variant in COMFY_VARIANTS:
        result = out[variant]
        assert result["type"] == "SD3"
        assert result["max_abs_lora"] > 1e-3  # the LoRA changes the weights ...
        assert result["max_abs_vs_merged"] < 1e-5  # ... exactly as the peft model's merged weights
        assert result["unchanged_model_kept"] == 0.0  # the input MODEL is left as it was
        assert "strength 1 (metadata tdm.lora_strength)" in result["summary"]  # the release's, not the input's 0.3
        assert "converted on load from its positional list" in result["summary"]
        assert "WARNING" not in result["summary"]  # every converted key loaded
    assert out["sd3"]["changed"] < out["sd3.5"]["changed"]  # SD3.5's dual attention layer is patched too
    assert re.search(r"tensors in 'ema_parameters', but a rank-32 LoRA .* has \d+ trainable", out["sd3.5"]["wrong"])
    assert "on-load conversion reads off SD3 / SD3.5 models only" in out["not_sd3"]
    assert "python -m tdm_train.convert" in out["not_sd3"]


ZIMAGE = dict(in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
              axes_dims=[4, 6, 6], axes_lens=[64, 32, 32])  # Z-Image-Turbo's layout (layers + both refiners), tiny
# ComfyUI 0.38's Z-Image LoRA key map (comfy/utils.py z_image_to_diffusers, read from its source) takes
# transformer.<these diffusers names> for the attention projections of every block
ZIMAGE_COMFY_NAMES = re.compile(r"transformer\.(layers|noise_refiner|context_refiner)\.\d+\.attention\."
                                r"(to_q|to_k|to_v|to_out\.0)\.(lora_A\.weight|lora_B\.weight|alpha)")


def test_the_tdm_r1_student_converts_on_its_z_image_base(tmp_path):
    """TDM-R1's release: peft LoraConfig(r 32, alpha 64, the six targets its README names, of which
    Z-Image has to_q / to_k / to_v / to_out.0) on Z-Image-Turbo, the EMA list in peft's order."""
    from diffusers import ZImageTransformer2DModel
    from peft import LoraConfig, inject_adapter_in_model
    from safetensors.torch import load_file

    from tdm_train.lora.merge import fuse_lora

    release = RELEASES["tdm-r1"]
    torch.manual_seed(0)
    ZImageTransformer2DModel(**ZIMAGE).save_pretrained(tmp_path / "base" / "transformer")
    student = ZImageTransformer2DModel.from_pretrained(tmp_path / "base" / "transformer")
    # the LoraConfig exactly as TDM-R1's README builds it (not read from RELEASES: the test checks those)
    inject_adapter_in_model(LoraConfig(r=32, lora_alpha=64, init_lora_weights="gaussian", target_modules=[
        "to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]), student)
    trainable = [p for name, p in student.named_parameters() if "lora_" in name]
    with torch.no_grad():
        for p in trainable:
            p.normal_(0, 0.05)
    torch.save({"decay": 0.999, "ema_parameters": [p.detach().clone() for p in trainable]}, tmp_path / "tdmr1.ckpt")
    diffusers_file, comfy_file = convert(tmp_path / "tdmr1.ckpt", tmp_path / "base", tmp_path / "out", release)

    gen = torch.Generator().manual_seed(1)
    x = [torch.randn(4, 1, 8, 8, generator=gen) for _ in range(2)]
    caps = [torch.randn(5, 16, generator=gen) for _ in range(2)]
    t = torch.tensor([0.3, 0.9])

    def run(model):
        return torch.stack(model.eval()(x, t, caps).sample)

    with torch.no_grad():
        reference = run(student)
        plain = run(ZImageTransformer2DModel.from_pretrained(tmp_path / "base" / "transformer"))
        assert (plain - reference).abs().max() > 1e-2
        loaded = ZImageTransformer2DModel.from_pretrained(tmp_path / "base" / "transformer")
        loaded.load_lora_adapter(str(tmp_path / "out"), weight_name=diffusers_file.name, prefix="transformer")
        assert torch.allclose(run(loaded), reference, atol=1e-5)
        fused = ZImageTransformer2DModel.from_pretrained(tmp_path / "base" / "transformer")
        assert fuse_lora(fused, comfy_file).modules == (2 + 1 + 1) * 4  # layers + noise + context refiner
        assert torch.allclose(run(fused), reference, atol=1e-5)
    keys = load_file(str(comfy_file))
    assert len(keys) == 3 * 16 and all(ZIMAGE_COMFY_NAMES.fullmatch(k) for k in keys)
