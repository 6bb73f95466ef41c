"""Per-backbone training recipes: the teacher guidance (CFG) that TDM folds into its target when
the user sets none (``--real_guidance_scale`` left out, the node's ``training_cfg`` at 0 = auto).

TDM distils the CFG teacher f_w = f_c + (w - 1)(f_c - f_u) into a student that samples at cfg 1,
so w decides what the student looks like: at w = 1 it learns the unguided teacher. Each value
below names its source (see /README.md, "Training guidance"); the digits demo keeps its own
guidance (2, tdm_train/demos/digits) and the Gaussian-mixture toy, whose exact teacher has no
condition, trains at 1.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GuidanceRecipe:
    scale: float
    source: str  # where the value comes from, shown in logs and written to the model card


RECOMMENDED_GUIDANCE: dict[str, GuidanceRecipe] = {
    # The official demo, Luo-Yihong/TDM train_tdm_demo.py (a PixArt-alpha 512 demo): its README
    # command passes --cfg 4.5 (the argparse default is 2). The paper reports 3.5 for PixArt-alpha
    # (secondary notes only); the demo is the code that ran, so its value is the default.
    "pixart": GuidanceRecipe(4.5, "the official TDM demo (train_tdm_demo.py, README command --cfg 4.5)"),
    # The paper's SDXL training hyper-parameters (CFG 8; the 25-step SDXL teacher baseline of its
    # Table 1 samples at 7.5). Known from secondary notes of the paper, not checked against the PDF.
    "sdxl": GuidanceRecipe(8.0, "the TDM paper's SDXL training setting (CFG 8)"),
    # The paper's SD1.5 training hyper-parameters (CFG 3.5, the same as its SD1.5 teacher baseline);
    # secondary notes, as for SDXL. Only the ComfyUI node trains SD1.x/2.x models.
    "sd15": GuidanceRecipe(3.5, "the TDM paper's SD1.5 training setting (CFG 3.5)"),
    # The paper gives no training guidance for CogVideoX-2B (only its four training timesteps are
    # known). Our choice: CogVideoX-2B's own sampling guidance, 6 (the default of diffusers'
    # CogVideoXPipeline and of THUDM's examples), following the paper's pattern of training at
    # about the teacher's sampling CFG (SD1.5 3.5 -> 3.5, SDXL 7.5 -> 8).
    "cogvideox": GuidanceRecipe(6.0, "our choice: CogVideoX-2B's own sampling guidance (6); the paper gives none"),
    # Neither the paper nor the official code states the guidance of the TDM SD3 / SD3.5 LoRAs.
    # Our choice, by the same pattern: each teacher's own sampling guidance from its model card
    # (stabilityai/stable-diffusion-3-medium: 7.0 at 28 steps; stable-diffusion-3.5-medium: 4.5 at 40).
    "sd3": GuidanceRecipe(7.0, "our choice: SD3-Medium's own sampling guidance (7, its model card); the paper gives none"),
    "sd3.5": GuidanceRecipe(4.5, "our choice: SD3.5-Medium's own sampling guidance (4.5, its model card); the paper "
                                 "gives none"),
}


# families trained on a rectified-flow schedule (their student grid spans T_s = 1000, from pure noise)
FLOW_FAMILIES = ("sd3", "sd3.5")


def default_total_steps(family: str | None) -> int:
    """T_s of the uniform student grid when none is given: TDM's 900 (899/674/449/224), or 1000 on a
    flow family, whose grid starts at pure noise (sigma = 1 at index 999: 999/749/499/249)."""
    return 1000 if family in FLOW_FAMILIES else 900


def guidance_family(backbone: str, denoiser_config: dict) -> str:
    """The key of RECOMMENDED_GUIDANCE for a teacher: SD3.5 (dual-attention layers or qk norm in its
    transformer config) apart from SD3; the backbone itself otherwise."""
    if backbone == "sd3" and (denoiser_config.get("dual_attention_layers") or denoiser_config.get("qk_norm")):
        return "sd3.5"
    return backbone


def recommended_guidance(backbone: str) -> GuidanceRecipe:
    """The recipe of a backbone / model family ("sdxl", "pixart", "cogvideox", "sd15")."""
    try:
        return RECOMMENDED_GUIDANCE[backbone]
    except KeyError:
        raise ValueError(f"no recommended training guidance for {backbone!r}; known: "
                         f"{', '.join(RECOMMENDED_GUIDANCE)} (set the guidance explicitly)") from None


def resolve_guidance(value: float | None, backbone: str) -> tuple[float, str]:
    """(the guidance to train with, where it comes from): an explicit value wins, 1.0 included;
    None means the backbone's recipe."""
    if value is not None:
        return float(value), "set explicitly"
    recipe = recommended_guidance(backbone)
    return recipe.scale, f"{backbone} default: {recipe.source}"


def describe_guidance(scale: float, backbone: str) -> str:
    """A model-card phrase for a trained guidance: its value and, when it is the backbone's
    recipe, the recipe's source."""
    recipe = RECOMMENDED_GUIDANCE.get(backbone)
    if scale == 1.0:
        note = "no CFG: the student learns the unguided teacher"
    elif recipe is not None and recipe.scale == scale:
        note = f"the {backbone} default, {recipe.source}"
    else:
        note = "chosen for this run" + (f"; the {backbone} default is {recipe.scale:g}" if recipe else "")
    return f"{scale:g} ({note})"
