"""Side-by-side timing of runtimes for one exported student: per network call and for the whole
few-step generation, measured in one run and reported as ratios (non-negotiable: performance is
measured in benchmarks, not in timed tests)."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

import torch

from .families import example_inputs, opt_point
from .generate import ExportedStudent
from .runtime import Runner

CONDITION_OF_INPUT = {"encoder_hidden_states": "prompt_embeds", "add_embeds": "add_embeds",
                      "encoder_attention_mask": "prompt_attention_mask", "pooled_projections": "pooled_prompt_embeds"}


def _summary(samples: list[float]) -> dict:
    samples = sorted(samples)
    return {"median_ms": statistics.median(samples), "p90_ms": samples[min(len(samples) - 1, int(0.9 * len(samples)))],
            "best_ms": samples[0], "runs": len(samples)}


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2, seed: int = 0) -> dict:
    """Wall time in ms of each function, run round-robin in a shuffled order per round, so that a
    slow spell of a shared machine hits every runtime alike (CUDA synchronised when in use)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    order, samples = list(fns), {name: [] for name in fns}
    shuffle = random.Random(seed).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            start = time.perf_counter()
            fns[name]()
            sync()
            samples[name].append((time.perf_counter() - start) * 1000)
    return {name: _summary(values) for name, values in samples.items()}


def compare_runtimes(runners: dict[str, Runner], repeats: int = 10, warmup: int = 2, seed: int = 0) -> dict:
    """Times every runner on the same inputs at the profile's opt shape: one network call, and a
    whole generation on the manifest's timesteps. The first runner is the baseline of the ratios
    (``baseline_ms / runner_ms``: above 1 means faster than the baseline)."""
    manifest = next(iter(runners.values())).manifest
    feeds = example_inputs(manifest.inputs, manifest.export.get("dynamic_axes", {}), opt_point(manifest),
                           torch.Generator().manual_seed(seed))
    cond = {CONDITION_OF_INPUT[k]: v.float() for k, v in feeds.items() if k in CONDITION_OF_INPUT}
    noise = torch.randn(feeds["sample"].shape, generator=torch.Generator().manual_seed(seed + 1))
    students = {name: ExportedStudent(runner) for name, runner in runners.items()}
    # PyTorch's CPU kernels slow down ~100x on denormal floats (seen with random-weight students
    # late in the trajectory); flushing them gives PyTorch its best case, as ONNX Runtime has
    flushed = torch.set_flush_denormal(True)
    try:
        outputs = {name: student.generate(cond, noise) for name, student in students.items()}
        calls = time_interleaved({name: (lambda r=runner: r(**feeds)) for name, runner in runners.items()}, repeats,
                                 warmup)
        generations = time_interleaved({name: (lambda s=student: s.generate(cond, noise))
                                        for name, student in students.items()}, max(3, repeats // 2), 1)
    finally:
        if flushed:
            torch.set_flush_denormal(False)
    baseline = next(iter(runners))
    rows = {}
    for name in runners:
        rows[name] = {"call": calls[name], "generation": generations[name],
                      "call_speedup": calls[baseline]["median_ms"] / calls[name]["median_ms"],
                      "generation_speedup": generations[baseline]["median_ms"] / generations[name]["median_ms"],
                      "generation_max_abs_vs_baseline": float((outputs[name] - outputs[baseline]).abs().max())}
    return {"family": manifest.family, "dtype": manifest.dtype, "steps": len(manifest.timesteps),
            "shape": list(feeds["sample"].shape), "threads": torch.get_num_threads(), "runtimes": rows}


def format_table(result: dict) -> str:
    lines = [f"{result['family']} student, {result['dtype']}, latent {result['shape']}, {result['steps']} steps, "
             f"{result['threads']} threads",
             "",
             f"| runtime | per call (ms, median) | speed-up | {result['steps']}-step generation (ms) | speed-up | max abs diff of latents |",
             "|---|---|---|---|---|---|"]
    for name, row in result["runtimes"].items():
        lines.append(f"| {name} | {row['call']['median_ms']:.2f} | {row['call_speedup']:.2f}x | "
                     f"{row['generation']['median_ms']:.1f} | {row['generation_speedup']:.2f}x | "
                     f"{row['generation_max_abs_vs_baseline']:.2e} |")
    return "\n".join(lines)
