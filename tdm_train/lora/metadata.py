"""What a TDM LoRA should be applied with: strength and sampling settings.

Our trainer records them in the safetensors metadata (``tdm.*`` keys). The official releases
carry none, so they are recognised by file name; the README table lists the same settings.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import PurePath

STRENGTH_KEY = "tdm.lora_strength"
SETTINGS_KEY = "tdm.sampling"  # JSON: {"preset": ..., "steps": ..., "shift": ..., "timesteps": [...]}
TRAINING_CFG_KEY = "tdm.training_cfg"  # the teacher guidance distilled into the student (it samples at cfg 1)
EMA_DECAY_KEY = "tdm.ema_decay"  # present when the weights are an EMA of the trained student's


@dataclass(frozen=True)
class LoraRecommendation:
    strength: float
    source: str  # where the numbers come from, shown to the user
    sampling: dict = field(default_factory=dict)


@dataclass(frozen=True)
class KnownRelease:
    name: str
    filename_pattern: str  # regex on the lower-cased file name
    strength: float
    sampling: dict


KNOWN_RELEASES = (
    # Luo-Yihong/TDM_sd3_lora: the README marks scale 0.125 as IMPORTANT; DPM-Solver flow sigmas, shift 6 (1..6)
    KnownRelease("TDM SD3-Medium LoRA", r"tdm.*sd3(?![._-]?5)|sd3(?![._-]?5).*tdm", 0.125,
                 {"preset": "flow_shifted", "steps": 4, "shift": 6.0, "cfg": 1.0}),
    # Luo-Yihong/TDM_sd3-5_lora: flow shift 3 in TDM-R1; applied at full strength
    KnownRelease("TDM SD3.5-Medium LoRA", r"tdm.*sd3[._-]?5|sd3[._-]?5.*tdm", 1.0,
                 {"preset": "flow_shifted", "steps": 4, "shift": 3.0, "cfg": 1.0}),
    # Luo-Yihong/TDM_CogVideoX-2B_LoRA: trained on 999/856/665/399
    KnownRelease("TDM CogVideoX-2B LoRA", r"tdm.*cogvideo|cogvideo.*tdm", 1.0,
                 {"preset": "cogvideox", "steps": 4, "cfg": 1.0}),
    # Luo-Yihong/TDM_dreamshaper_LoRA (tdm_dreamshaper.pt, converted to safetensors)
    KnownRelease("TDM Dreamshaper (SD1.5) LoRA", r"tdm.*dreamshaper|dreamshaper.*tdm", 1.0,
                 {"preset": "custom", "timesteps": [999, 749, 500, 250], "cfg": 1.0}),
)


def recommend(metadata: dict | None, filename: str) -> LoraRecommendation | None:
    """The recorded strength and settings of a LoRA: its ``tdm.*`` metadata first, then a known
    release by file name; None when nothing is known (apply it at 1.0 and say so)."""
    metadata = metadata or {}
    if STRENGTH_KEY in metadata:
        try:
            strength = float(metadata[STRENGTH_KEY])
        except ValueError:
            raise ValueError(f"{filename}: metadata {STRENGTH_KEY}={metadata[STRENGTH_KEY]!r} is not a number") from None
        sampling = {}
        if SETTINGS_KEY in metadata:
            try:
                sampling = json.loads(metadata[SETTINGS_KEY])
            except json.JSONDecodeError:
                raise ValueError(f"{filename}: metadata {SETTINGS_KEY} is not valid JSON") from None
        return LoraRecommendation(strength, f"metadata {STRENGTH_KEY}", sampling)
    name = PurePath(filename).name.lower()
    for release in KNOWN_RELEASES:
        if re.search(release.filename_pattern, name):
            return LoraRecommendation(release.strength, f"known release: {release.name}", dict(release.sampling))
    return None


def describe_unmatched(unmatched: list[str], total: int, limit: int = 12) -> str:
    """A readable list of LoRA keys that matched no weight of the model."""
    shown = ", ".join(sorted(unmatched)[:limit])
    more = f" (+{len(unmatched) - limit} more)" if len(unmatched) > limit else ""
    return f"{len(unmatched)} of {total} LoRA keys matched no weight of this model: {shown}{more}"
