"""The TDM Engine Loader's stand-in for ComfyUI's diffusion model, without ComfyUI: ComfyUI's
call (x, timesteps, context, y / c_size, c_ar) reaches the exported network as the export's named
inputs, batches over the profile run in chunks, PixArt's unmasked T5 states are padded and masked."""

import pytest
import torch

import onnxruntime  # noqa: F401
import onnx_graphsurgeon  # noqa: F401

from export.families import ExportShapes, family_spec  # noqa: E402
from export.onnx_export import export_onnx  # noqa: E402
from export.runtime import TorchRunner, open_runner  # noqa: E402
from nodes.engine_models import EngineDiffusionModel  # noqa: E402
from tdm_train.tiny_models import PIXART_SCHEDULER_CONFIG, SDXL_SCHEDULER_CONFIG  # noqa: E402
from tdm_train.tiny_models import tiny_pixart_transformer, tiny_sdxl_unet  # noqa: E402


def _exported(tmp_path, family, make, shapes, scheduler):
    manifest = export_onnx(family_spec(family, make(), shapes, "fp32"), tmp_path, dtype="fp32", shapes=shapes,
                           scheduler_config=scheduler, timesteps=[899, 674, 449, 224])
    reference = TorchRunner(family_spec(family, make(), shapes, "fp32").module, manifest)
    return EngineDiffusionModel(open_runner(tmp_path, provider="cpu"), manifest), reference


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    shapes = ExportShapes(batch=(1, 1, 2), height=(8, 8, 8), width=(8, 8, 8), text_len=(8, 8, 16))
    return _exported(tmp_path_factory.mktemp("sdxl"), "sdxl", tiny_sdxl_unet, shapes, SDXL_SCHEDULER_CONFIG)


def test_comfyui_call_reaches_the_sdxl_network_and_large_batches_run_in_chunks(sdxl):
    engine, reference = sdxl
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 4, 8, 8, generator=gen), torch.tensor([899.0, 449.0, 224.0])
    context, y = torch.randn(3, 16, 64, generator=gen), torch.randn(3, 80, generator=gen)
    out = engine(x, t, context=context, y=y, control=None, transformer_options={})  # 3 > the profile's 2
    expected = torch.cat([reference(sample=x[part], timestep=t[part], encoder_hidden_states=context[part],
                                    add_embeds=y[part]) for part in (slice(0, 2), slice(2, 3))])
    assert out.shape == x.shape and out.dtype == x.dtype and engine.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_sdxl_engine_refuses_what_it_cannot_do(sdxl):
    engine, _ = sdxl
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([899.0]), torch.randn(1, 8, 64)
    with pytest.raises(ValueError, match="needs ComfyUI's y"):
        engine(x, t, context=context)
    with pytest.raises(ValueError, match="no ControlNet inputs"):
        engine(x, t, context=context, y=torch.randn(1, 80), control={"output": []})
    with pytest.raises(ValueError, match=r"'sample' has shape \[1, 4, 16, 16\].*outside the exported profile"):
        engine(torch.randn(1, 4, 16, 16), t, context=context, y=torch.randn(1, 80))


def test_pixart_context_without_mask_is_padded_and_masked(tmp_path):
    shapes = ExportShapes(batch=(1, 1, 2), height=(8, 8, 8), width=(8, 8, 8), text_len=(16, 16, 16))
    engine, reference = _exported(tmp_path, "pixart", lambda: tiny_pixart_transformer(8), shapes,
                                  PIXART_SCHEDULER_CONFIG)
    gen = torch.Generator().manual_seed(1)
    x, t, context = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([899.0, 224.0]), torch.randn(2, 10, 32, generator=gen)
    out = engine(x, t, context=context)
    padded = torch.cat([context, torch.zeros(2, 6, 32)], dim=1)
    mask = torch.cat([torch.ones(2, 10), torch.zeros(2, 6)], dim=1)
    expected = reference(sample=x, timestep=t, encoder_hidden_states=padded, encoder_attention_mask=mask)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    # the mask matters: the padding would otherwise be attended to
    unmasked = reference(sample=x, timestep=t, encoder_hidden_states=padded, encoder_attention_mask=torch.ones(2, 16))
    assert (unmasked - expected).abs().max() > 1e-3
    with pytest.raises(ValueError, match="20 T5 tokens; this PixArt engine takes at most 16"):
        engine(x, t, context=torch.randn(2, 20, 32))
