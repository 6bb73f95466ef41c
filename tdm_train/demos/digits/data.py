"""scikit-learn's handwritten digits (1797 images, 8x8, 16 grey levels) as diffusion data."""

from __future__ import annotations

import torch

NUM_CLASSES = 10
NULL_CLASS = 10  # the "empty prompt" of classifier-free guidance


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 1, 8, 8] in [-1, 1], labels [N])."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("the digits demo needs scikit-learn: pip install scikit-learn") from error
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return images, torch.tensor(digits.target, dtype=torch.long)
