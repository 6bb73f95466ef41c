"""Scatter plots as PNG with Pillow only (no matplotlib in a ComfyUI install)."""

from __future__ import annotations

from pathlib import Path

import torch

PANEL = 320
MARGIN = 24
COLOURS = [(60, 60, 60), (31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def scatter_panels(
    panels: list[tuple[str, torch.Tensor]], path: str | Path, extent: float, marks: torch.Tensor | None = None
) -> Path:
    """Draw each (title, [N, 2] points) in its own square panel spanning [-extent, extent]^2;
    ``marks`` (e.g. the mixture means) are drawn as small crosses in every panel."""
    from PIL import Image, ImageDraw

    width = len(panels) * (PANEL + MARGIN) + MARGIN
    height = PANEL + 2 * MARGIN
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)

    def to_pixel(x0: int, point) -> tuple[float, float]:
        u = (float(point[0]) + extent) / (2 * extent)
        v = (extent - float(point[1])) / (2 * extent)
        return x0 + u * PANEL, MARGIN + v * PANEL

    for index, (title, points) in enumerate(panels):
        x0 = MARGIN + index * (PANEL + MARGIN)
        draw.rectangle([x0, MARGIN, x0 + PANEL, MARGIN + PANEL], outline=(180, 180, 180))
        draw.text((x0 + 4, 6), title, fill=(0, 0, 0))
        colour = COLOURS[index % len(COLOURS)]
        for point in points.detach().cpu()[:, :2].tolist():
            px, py = to_pixel(x0, point)
            if x0 <= px <= x0 + PANEL and MARGIN <= py <= MARGIN + PANEL:
                draw.rectangle([px, py, px + 1, py + 1], fill=colour)
        if marks is not None:
            for mark in marks.cpu()[:, :2].tolist():
                px, py = to_pixel(x0, mark)
                draw.line([px - 3, py, px + 3, py], fill=(0, 0, 0))
                draw.line([px, py - 3, px, py + 3], fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
