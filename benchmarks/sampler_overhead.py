"""Wall time of the TDM sampler against the bare model calls it makes, and of a 4-step student
against a 50-step CFG teacher, on a tiny SDXL-shaped UNet (CPU, nothing downloaded).

    .venv/bin/python benchmarks/sampler_overhead.py [--repeats 30] [--size 32] [--batch 2]

Side by side in one run, interleaved in a shuffled order, best of the repeats (the least disturbed run of each):
- bare: the UNet called on exactly the inputs the sampler feeds it (same count, 4);
- tdm_sample: the VP-form sampler (what the trainer's rollout runs), eps -> x0 conversion included;
- sample_tdm: the k-diffusion-form sampler (what the ComfyUI TDM Sampler runs) over a ComfyUI-style
  EPS model wrapper, against bare calls of that same wrapper;
- the samplers' own work, timed with a null model (x0 = x / 2) so that model time is ~0: the
  ratio column is then 1 + own work / bare model time, free of the run-to-run noise (~3% here)
  that the end-to-end ratios carry.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tdm_train import NoiseSchedule, sample_tdm, tdm_sample, tdm_timesteps  # noqa: E402
from tdm_train.tiny_models import SDXL_SCHEDULER_CONFIG, tiny_sdxl_conditioning, tiny_sdxl_unet  # noqa: E402


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--size", type=int, default=32, help="latent height = width")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--teacher-steps", type=int, default=50)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps thread-pool jitter out)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    unet = tiny_sdxl_unet()
    schedule = NoiseSchedule.from_diffusers_config(SDXL_SCHEDULER_CONFIG)
    cond = tiny_sdxl_conditioning(args.batch)
    uncond = tiny_sdxl_conditioning(args.batch, seed=1)
    both = {
        "encoder_hidden_states": torch.cat([cond["encoder_hidden_states"], uncond["encoder_hidden_states"]]),
        "added_cond_kwargs": {k: torch.cat([cond["added_cond_kwargs"][k], uncond["added_cond_kwargs"][k]])
                              for k in cond["added_cond_kwargs"]},
    }
    grid = tdm_timesteps()
    noise = torch.randn(args.batch, 4, args.size, args.size, generator=torch.Generator().manual_seed(0))

    recorded = []

    def x0_fn(x_t, t):
        recorded.append((x_t.clone(), t.clone()))
        return schedule.x0_from_output(unet(x_t, t, **cond).sample, x_t, t)

    with torch.no_grad():
        tdm_sample(x0_fn, noise, grid, schedule)
        inputs = list(recorded)

        def student_fn(x_t, t):
            return schedule.x0_from_output(unet(x_t, t, **cond).sample, x_t, t)

        # ComfyUI's EPS view of the same network: state x = x_t / alpha, input x / sqrt(1 + sigma^2)
        ve_table = (schedule.sigmas / schedule.alphas).float()

        def comfy_model(x, sigma):
            t = (ve_table.log()[None] - sigma.log()[:, None]).abs().argmin(dim=1)
            s = sigma[:, None, None, None]
            return x - s * unet(x / torch.sqrt(1 + s**2), t, **cond).sample

        sigmas = torch.cat([schedule.k_diffusion_sigma(torch.tensor(grid)).float(), torch.zeros(1)])
        x_start = noise * torch.sqrt(1 + sigmas[0] ** 2)
        comfy_inputs = []
        sample_tdm(lambda x, s: comfy_inputs.append((x.clone(), s.clone())) or comfy_model(x, s), x_start, sigmas)

        def teacher_fn(x_t, t):
            eps_c, eps_u = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), **both).sample.chunk(2)
            eps = eps_u + args.cfg * (eps_c - eps_u)
            return schedule.x0_from_output(eps, x_t, t)

        teacher_grid = tdm_timesteps(args.teacher_steps, 1000)
        runs = {
            "bare": lambda: [unet(x, t, **cond).sample for x, t in inputs],
            "tdm_sample": lambda: tdm_sample(student_fn, noise, grid, schedule),
            "bare_comfy": lambda: [comfy_model(x, s) for x, s in comfy_inputs],
            "sample_tdm": lambda: sample_tdm(comfy_model, x_start, sigmas),
        }
        null_vp = lambda x_t, t: x_t * 0.5  # noqa: E731
        null_ve = lambda x, sigma: x * 0.5  # noqa: E731
        runs["null_bare"] = lambda: [null_vp(x, t) for x, t in inputs]
        runs["null_tdm_sample"] = lambda: tdm_sample(null_vp, noise, grid, schedule)
        runs["null_sample_tdm"] = lambda: sample_tdm(null_ve, x_start, sigmas)
        for fn in runs.values():  # warm-up
            fn()
        times = {name: [] for name in runs}
        order = list(runs)
        shuffler = random.Random(0)
        for _ in range(args.repeats):
            shuffler.shuffle(order)  # a fixed order biases whichever run follows another
            for name in order:
                times[name].append(_timed(runs[name]))
        teacher_times, student_times = [], []
        for _ in range(max(3, args.repeats // 10)):
            teacher_times.append(_timed(lambda: tdm_sample(teacher_fn, noise, teacher_grid, schedule)))
            student_times.append(_timed(runs["tdm_sample"]))

    med = {name: min(values) for name, values in times.items()}
    teacher, student = statistics.median(teacher_times), statistics.median(student_times)
    print(f"tiny SDXL-shaped UNet ({sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params), "
          f"batch {args.batch}, latent {args.size}x{args.size}, {torch.get_num_threads()} threads, "
          f"best of {args.repeats}\n")
    print("| measurement | wall time (ms) | ratio |")
    print("|---|---:|---:|")
    print(f"| 4 bare UNet calls | {1e3 * med['bare']:.2f} | 1.000 |")
    print(f"| tdm_sample, 4 steps (trainer rollout form) | {1e3 * med['tdm_sample']:.2f} | "
          f"{med['tdm_sample'] / med['bare']:.3f} |")
    print(f"| 4 bare calls of the ComfyUI-style EPS wrapper | {1e3 * med['bare_comfy']:.2f} | 1.000 |")
    print(f"| sample_tdm, 4 steps (ComfyUI TDM Sampler form) | {1e3 * med['sample_tdm']:.2f} | "
          f"{med['sample_tdm'] / med['bare_comfy']:.3f} |")
    own_vp = med["null_tdm_sample"] - med["null_bare"]
    own_ve = med["null_sample_tdm"] - med["null_bare"]
    print(f"| tdm_sample's own work (null model) | {1e3 * own_vp:.3f} | {1 + own_vp / med['bare']:.4f} |")
    print(f"| sample_tdm's own work (null model) | {1e3 * own_ve:.3f} | {1 + own_ve / med['bare_comfy']:.4f} |")
    print(f"| teacher DDIM {args.teacher_steps} steps, CFG {args.cfg} (batched cond+uncond) | {1e3 * teacher:.1f} | "
          f"1.000 |")
    print(f"| TDM student 4 steps, cfg 1 | {1e3 * student:.1f} | {student / teacher:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
