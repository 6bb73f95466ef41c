"""Accuracy of an exported network against PyTorch: max / mean absolute error and cosine
similarity, judged per dtype.

fp32 ONNX must match fp32 PyTorch elementwise (observed max |error| ~1e-6 on ONNX Runtime CPU).
fp16 cannot: it is compared with the fp32 model by statistics (cosine, mean error relative to
the output's magnitude), as NVIDIA's and optimum's practice suggests for reduced precision."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from tdm_train.errors import EXIT_TOLERANCE, ToolError


@dataclass(frozen=True)
class Tolerance:
    atol: float  # max |error| <= atol + rtol * max |reference|
    rtol: float
    min_cosine: float
    max_mean_rel: float  # mean |error| <= max_mean_rel * mean |reference|


TOLERANCES = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-4, min_cosine=0.99999, max_mean_rel=1e-4),
    # fp16 weights and activations vs the fp32 model: no elementwise bound, only the statistics
    "fp16": Tolerance(atol=float("inf"), rtol=0.0, min_cosine=0.999, max_mean_rel=1e-2),
    # bf16 compute (OpenVINO's bf16 hint, on an fp32 or fp16 export): the same statistics with the mean error
    # scaled to bf16's 8-bit mantissa, 4x coarser than fp16's 10 (measured 3.8% on the tiny SDXL student)
    "bf16": Tolerance(atol=float("inf"), rtol=0.0, min_cosine=0.999, max_mean_rel=5e-2),
}


@dataclass(frozen=True)
class ErrorStats:
    max_abs: float
    mean_abs: float
    cosine: float
    reference_max_abs: float
    reference_mean_abs: float
    finite: bool

    def failures(self, tolerance: Tolerance) -> list[str]:
        """What is out of tolerance, in words (empty when it passes)."""
        problems = []
        if not self.finite:
            problems.append("the output has NaN or Inf")
        bound = tolerance.atol + tolerance.rtol * self.reference_max_abs
        if self.max_abs > bound:
            problems.append(f"max |error| {self.max_abs:.3g} > {bound:.3g}")
        if self.cosine < tolerance.min_cosine:
            problems.append(f"cosine {self.cosine:.6f} < {tolerance.min_cosine}")
        mean_bound = tolerance.max_mean_rel * self.reference_mean_abs
        if self.mean_abs > mean_bound:
            problems.append(f"mean |error| {self.mean_abs:.3g} > {mean_bound:.3g}")
        return problems

    def as_dict(self) -> dict:
        return asdict(self)


def compare(reference: torch.Tensor, output: torch.Tensor) -> ErrorStats:
    if reference.shape != output.shape:
        raise ValueError(f"output shape {tuple(output.shape)} differs from PyTorch's {tuple(reference.shape)}")
    ref, out = reference.double().flatten(), output.double().flatten()
    finite = bool(torch.isfinite(out).all())
    diff = (ref - out).abs()
    denominator = ref.norm() * out.norm()
    cosine = float(ref @ out / denominator) if denominator > 0 else float(torch.equal(ref, out))
    return ErrorStats(max_abs=float(diff.max()), mean_abs=float(diff.mean()), cosine=cosine if finite else 0.0,
                      reference_max_abs=float(ref.abs().max()), reference_mean_abs=float(ref.abs().mean()),
                      finite=finite)


class ValidationFailed(ToolError, RuntimeError):
    """The exported network is out of tolerance; the message lists where and by how much."""

    exit_code = EXIT_TOLERANCE
