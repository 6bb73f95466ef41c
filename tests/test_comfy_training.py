"""The ComfyUI trainer's parts that need no ComfyUI: the VE/flow scaling of its x0 calls, the
native LoRA keys, conditioning banks of mixed lengths, gradient checkpointing of blocks, the
inference-tensor fix, and the node's inputs (names, paths, grids, loss curve). The whole node
runs in a real ComfyUI in test_comfyui_integration.py."""

import math

import pytest
import torch
from conftest import submodule as _submodule

from nodes.comfy_trainer import (  # noqa: E402
    _same_length,
    bank_same_length,
    checkpointed_blocks,
    native_lora,
    without_inference_tensors,
)
from tdm_train.schedule import NoiseSchedule  # noqa: E402
from tdm_train.tiny_models import SDXL_SCHEDULER_CONFIG  # noqa: E402


class _RecordingBase:
    """Stands in for a ComfyUI model_base: apply_model records what it was called with."""

    def __init__(self):
        self.calls = []
        self.diffusion_model = torch.nn.Linear(2, 2)

    def apply_model(self, x, sigma, **cond):
        self.calls.append((x, sigma, cond))
        return x * 0.5


class _Patcher:
    def __init__(self, sampling):
        self.model = _RecordingBase()
        self.sampling = sampling

    def get_model_object(self, name):
        assert name == "model_sampling"
        return self.sampling


def _backend(stubs, flow: bool):
    from nodes.comfy_trainer import ComfyBackend

    ms = stubs["comfy.model_sampling"]
    reference = NoiseSchedule.from_diffusers_config(SDXL_SCHEDULER_CONFIG)
    if flow:
        sampling = type("Flow", (ms.ModelSamplingDiscrete, ms.CONST), {})()
        sampling.sigmas = torch.linspace(0.001, 1.0, 1000)
    else:
        sampling = type("Discrete", (ms.ModelSamplingDiscrete,), {})()
        sampling.sigmas = (reference.sigmas / reference.alphas).float()  # ComfyUI keeps sigma_t / alpha_t
    cond = {"c_crossattn": torch.ones(1, 77, 8)}
    return ComfyBackend(_Patcher(sampling), "sdxl", cond, (4, 8, 8)), reference


def test_x0_calls_comfyuis_model_in_its_own_space(stubs):
    backend, reference = _backend(stubs, flow=False)
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([899, 224])
    cond = {"c_crossattn": torch.zeros(2, 77, 8)}
    out = backend.x0(x_t, t, cond)
    x_in, sigma_in, passed = backend.base.calls[-1]
    alpha, sigma = reference.coefficients(t, x_t)
    torch.testing.assert_close(x_in, x_t / alpha)  # VE state
    torch.testing.assert_close(sigma_in, (sigma / alpha).reshape(-1), rtol=1e-5, atol=0)
    assert torch.allclose(sigma_in[0], torch.tensor(8.3028), atol=1e-3)  # SDXL's sigma at t = 899
    assert passed.keys() == cond.keys() and passed["c_crossattn"] is cond["c_crossattn"] and out.dtype == torch.float32
    # the schedule rebuilt from ComfyUI's sigmas is the model's own
    torch.testing.assert_close(backend.schedule.alphas, reference.alphas, rtol=1e-6, atol=1e-7)

    flow, _ = _backend(stubs, flow=True)
    flow.x0(x_t, torch.tensor([999, 500]), cond)
    x_in, sigma_in, _ = flow.base.calls[-1]
    assert torch.equal(x_in, x_t)  # flow models take the state as it is
    torch.testing.assert_close(sigma_in, torch.tensor([1.0, float(torch.linspace(0.001, 1.0, 1000)[500])]))
    assert flow.flow and float(flow.schedule.alphas[999]) == pytest.approx(0.0, abs=1e-7)


def test_unconditional_is_the_negative_batched_to_the_prompts_length(stubs):
    backend, _ = _backend(stubs, flow=False)
    uncond = backend.unconditional({"c_crossattn": torch.zeros(3, 154, 8)})
    assert uncond["c_crossattn"].shape == (3, 154, 8)
    assert torch.equal(uncond["c_crossattn"][:, 77:], uncond["c_crossattn"][:, :77])  # ComfyUI's repeat rule
    bank, negative = bank_same_length({"c_crossattn": torch.randn(2, 154, 8), "y": torch.randn(2, 16)},
                                      {"c_crossattn": torch.randn(1, 231, 8), "y": torch.randn(1, 16)})
    assert bank["c_crossattn"].shape[1] == negative["c_crossattn"].shape[1] == math.lcm(154, 231)
    with pytest.raises(ValueError, match="cannot be batched"):
        _same_length(torch.randn(1, 77, 8), 100)


def test_native_lora_keys_and_true_alpha():
    state = {"input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_down.weight": torch.randn(4, 320),
             "input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_up.weight": torch.randn(320, 4)}
    native = native_lora(state, alpha=64.0)
    assert set(native) == {"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_down.weight",
                           "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_up.weight",
                           "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.alpha"}
    assert native["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.alpha"].item() == 64.0


class _Blocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.input_blocks = torch.nn.ModuleList([torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)])
        self.out = torch.nn.Linear(6, 1)

    def forward(self, x):
        for block in self.input_blocks:
            x = torch.tanh(block(x))
        return self.out(x)


def test_checkpointed_blocks_give_the_same_gradients_and_are_restored():
    model, x = _Blocks(), torch.randn(3, 6)
    model(x).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    originals = [b.forward for b in model.input_blocks]
    with checkpointed_blocks(model, True):
        assert all(b.forward is not f for b, f in zip(model.input_blocks, originals))
        model(x).sum().backward()
    for got, expected in zip((p.grad for p in model.parameters()), plain):
        torch.testing.assert_close(got, expected)
    assert [b.forward for b in model.input_blocks] == originals


def test_inference_tensors_are_replaced_so_autograd_can_run():
    with torch.inference_mode():
        norm = torch.nn.LayerNorm(4)
        norm.register_buffer("scale", torch.ones(4))
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="Inference tensors"):
        norm(x).sum().backward()
    assert without_inference_tensors(norm) == 3  # weight, bias, buffer
    norm(x).sum().backward()
    assert x.grad is not None and not norm.weight.requires_grad


def test_node_inputs_paths_and_loss_curve(pack, stubs, tmp_path, monkeypatch):
    training = _submodule(pack, "training")
    folder_paths = stubs["folder_paths"]
    loras, inputs = tmp_path / "loras", tmp_path / "input"
    inputs.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(loras)], set()))
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(inputs))
    assert training.lora_output_path("students/sdxl_tdm") == (loras / "students" / "sdxl_tdm.safetensors").resolve()
    assert training.lora_output_path("x.safetensors").name == "x.safetensors"
    for bad in ("../outside", "/abs", ""):
        with pytest.raises(ValueError, match="refusing|relative file name"):
            training.lora_output_path(bad)

    (inputs / "prompts.txt").write_text("a cat\n\na dog\n")
    assert training.prompt_files() == ["(none)", "prompts.txt"]
    assert training.collect_prompts("a fox\n  \n", "prompts.txt") == ["a fox", "a cat", "a dog"]
    with pytest.raises(ValueError, match="no prompts"):
        training.collect_prompts("  \n", "(none)")
    with pytest.raises(ValueError, match="outside"):
        training.collect_prompts("a", "../secret.txt")

    assert training.parse_grid("tdm_uniform", 4, "") == (899, 674, 449, 224)
    assert training.parse_grid("custom", 4, "999, 856, 665,399") == (999, 856, 665, 399)
    with pytest.raises(ValueError):
        training.parse_grid("custom", 4, "100, 200")  # not decreasing
    assert training.parse_unify("1, 2,4") == (1, 2, 4) and training.parse_unify(" ") is None

    history = [{"generator_loss": 1.0 / (i + 1), "fake_loss": 0.5 + 0.1 * i} for i in range(10)]
    history[3]["skipped_nonfinite"] = True
    curve = training.loss_curve(history)
    assert curve.shape == (1, 320, 640, 3) and curve.dtype == torch.float32
    assert 0 <= curve.min() and curve.max() <= 1 and curve.std() > 0.01
    red = (curve[0, :, :, 0] > 0.8) & (curve[0, :, :, 1] < 0.1) & (curve[0, :, :, 2] < 0.1)
    assert red.any()  # the skipped step is marked


def _comfy_model(family: str):
    """A MODEL whose model_base training_family() reads as ``family``."""
    from types import SimpleNamespace

    if family == "sd15":
        base = type("BaseModel", (), {"adm_channels": 0,
                                      "model_config": SimpleNamespace(unet_config={"context_dim": 768})})()
    else:
        base = type({"sdxl": "SDXL", "pixart": "PixArt"}[family], (), {})()
    return SimpleNamespace(model=base, wrappers={})  # a ModelPatcher has a wrappers dict


def _train_node_config(training, monkeypatch, family, **widgets):
    """TDM Train LoRA's execute with its schema defaults (and ``widgets``) on a ``family`` MODEL,
    the training itself replaced by a recorder: (the TrainConfig it was given, the node's summary)."""
    schema = training.TDMTrainLoRA.define_schema()
    values = {i.id: i.default for i in schema.inputs if i.id not in ("model", "clip")}
    values.update(lora_name=f"guidance_{family}", **widgets)
    seen = {}

    def recorded(model, clip, prompts, negative, width, height, config, dtype, checkpointing, lora_path):
        seen["config"] = config
        return model, {}, []

    monkeypatch.setattr(training, "train_in_comfyui", recorded)
    output = training.TDMTrainLoRA.execute(model=_comfy_model(family), clip=None, **values)
    return seen["config"], output.ui.value


def _run_train_node(training, monkeypatch, tmp_path, family, **widgets):
    """(the training guidance the node resolved, its summary)."""
    config, summary = _train_node_config(training, monkeypatch, family, **widgets)
    return config.tdm.guidance_scale, summary


@pytest.mark.parametrize(("dtype", "precision", "scaled"), [("fp16", "fp16", True), ("bf16", "bf16", False),
                                                            ("fp32", "no", False)])
def test_train_node_fp16_gets_the_trainers_loss_scaling(pack, stubs, tmp_path, monkeypatch, dtype, precision, scaled):
    training = _submodule(pack, "training")
    folder_paths = stubs["folder_paths"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(tmp_path / "loras")], set()))
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path / "output"))
    config, _ = _train_node_config(training, monkeypatch, "sdxl", training_dtype=dtype)
    assert config.mixed_precision == precision
    assert (config.mixed_precision == "fp16") is scaled  # TDMTrainer enables its GradScalers for fp16 only


@pytest.mark.parametrize("family", ["sdxl", "sd15", "pixart"])
def test_train_node_training_cfg_auto_is_the_familys_recipe_as_in_the_cli(pack, stubs, tmp_path, monkeypatch, family):
    from tdm_train.cli import parse_args
    from tdm_train.training.arguments import tdm_config

    training = _submodule(pack, "training")
    folder_paths = stubs["folder_paths"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(tmp_path / "loras")], set()))
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path / "output"))
    cfg = {i.id: i for i in training.TDMTrainLoRA.define_schema().inputs}["training_cfg"]
    assert cfg.default == training.AUTO_CFG == 0.0 and cfg.min == 0.0 and "0 = auto" in cfg.tooltip

    expected = {"sdxl": 8.0, "sd15": 3.5, "pixart": 4.5}[family]  # recipes.py: the paper, the paper, the demo
    guidance, summary = _run_train_node(training, monkeypatch, tmp_path, family)
    assert guidance == expected and f"training CFG {expected:g} ({family} default" in summary
    if family != "sd15":  # the CLI trains no SD1.x: for the others the node agrees with python -m tdm_train
        assert tdm_config(parse_args([]), family).guidance_scale == guidance

    assert _run_train_node(training, monkeypatch, tmp_path, family, training_cfg=1.0)[0] == 1.0  # explicit wins
    assert _run_train_node(training, monkeypatch, tmp_path, family, training_cfg=6.5)[0] == 6.5
    with pytest.raises(ValueError, match="below 1"):
        _run_train_node(training, monkeypatch, tmp_path, family, training_cfg=0.5)


def test_comfy_trainer_records_the_training_cfg_in_the_lora(tmp_path):
    """ComfyTDMTrainer.export_lora writes the teacher guidance it trained with (tdm.training_cfg)."""
    from types import SimpleNamespace

    from safetensors import safe_open

    from nodes.comfy_trainer import ComfyTDMTrainer
    from tdm_train.distill import TDMConfig
    from tdm_train.training.trainer import TrainConfig

    state = {"blocks.0.attn.qkv.lora_down.weight": torch.randn(2, 8),
             "blocks.0.attn.qkv.lora_up.weight": torch.randn(24, 2)}
    trainer = SimpleNamespace(config=TrainConfig(output_dir=str(tmp_path), lora_rank=2, lora_alpha=2,
                                                 tdm=TDMConfig(guidance_scale=4.5)),
                              student_state=lambda: state, backend=SimpleNamespace(default_lora_targets=("attn.qkv",)),
                              objective=SimpleNamespace(timesteps=[899, 674, 449, 224]), step=3, family="pixart",
                              lora_path=tmp_path / "student.safetensors", unet_config=None, output_dir=tmp_path,
                              student_conditions=lambda: None)  # a fixed-K student
    (path,) = ComfyTDMTrainer.export_lora(trainer)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["tdm.training_cfg"] == "4.5"
