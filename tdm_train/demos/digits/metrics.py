"""FID on digits (Frechet distance of the classifier's penultimate features), class accuracy, and the
samples' own pixel statistics (the dataset lies in [-1, 1]; the metrics see the samples clamped to it)."""

from __future__ import annotations

import torch


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)

    def sqrtm(m):
        values, vectors = torch.linalg.eigh((m + m.T) / 2)
        return vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T

    root_a = sqrtm(cov_a)
    cross = sqrtm(root_a @ cov_b @ root_a)
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a + cov_b - 2 * cross))


@torch.no_grad()
def digits_quality(samples: torch.Tensor, labels: torch.Tensor, classifier, reference_features: torch.Tensor) -> dict:
    """FID against the reference (the whole dataset), the share classified as their prompt, and, of
    the samples as sampled (before the clamp the classifier sees), the mean pixel value
    (``pixel_mean``; the dataset's is -0.389) and the share of pixels outside [-1, 1]
    (``out_of_range``; the dataset's is 0). A few-step student's FID moves with its brightness."""
    samples = samples.float()
    features = classifier.features(samples.clamp(-1, 1))
    accuracy = (classifier.head(features).argmax(1) == labels).float().mean().item()
    return {"fid": frechet_distance(features, reference_features), "class_accuracy": accuracy,
            "pixel_mean": samples.mean().item(), "out_of_range": (samples.abs() > 1).float().mean().item()}
