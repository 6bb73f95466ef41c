"""Our TDM iteration against the official demo's iteration layout, on the same tiny PixArt-alpha
transformer: wall time (interleaved rounds in one process), counted FLOPs, network forwards.

    PYTHONPATH=. .venv/bin/python benchmarks/trainer_speed.py [--rounds 30] [--sample-size 8]
    PYTHONPATH=. .venv/bin/python benchmarks/trainer_speed.py --rounds 12 --heads 48 --rank 8   # 384 wide

Ours: the real ``TDMTrainer.train_step`` (PixArt backend, peft roles over one fp32 base, two LoRA
adapters). Official layout: benchmarks/official_layout.py, three full fp32 networks, the demo's
11 forwards (with its recomputation of the student's prediction and its unused teacher forward),
every student / fake parameter trained with AdamW. Both: batch 2, grid 899/674/449/224
(T_s = 900, K = 4), demo mid point, separate tau intervals, CFG 4.5, element-wise Huber loss,
importance weight and min-SNR-5, fp32, 1 thread. FLOPs: torch.utils.flop_counter.FlopCounterMode
over one whole iteration of each (forward + backward; optimizer arithmetic is not counted).
The tiny model (24 wide, 32K parameters) measures fixed per-module costs (peft's LoRA layers, role
switches, Python dispatch) more than arithmetic; ``--heads`` widens its layers (same depth) to show
where those costs stop mattering. Phases are timed from outside the trainer (instance wrappers).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from official_layout import OfficialDemoLayout, pixart_eps  # noqa: E402
from tdm_train.backends import PixArtBackend  # noqa: E402
from tdm_train.distill import TDMConfig  # noqa: E402
from tdm_train.tiny_models import PIXART_SCHEDULER_CONFIG, tiny_pixart_transformer  # noqa: E402
from tdm_train.training.trainer import TDMTrainer, TrainConfig  # noqa: E402

TEXT_LEN, CAPTION_DIM = 6, 32  # tiny_pixart_transformer's caption_channels


class Timers:
    """Accumulated seconds per named phase."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start
            self.calls[name] += 1

    def reset(self):
        self.seconds.clear()
        self.calls.clear()


def conditions(n: int = 4):
    gen = torch.Generator().manual_seed(0)
    bank = {"prompt_embeds": torch.randn(n, TEXT_LEN, CAPTION_DIM, generator=gen),
            "prompt_attention_mask": torch.ones(n, TEXT_LEN, dtype=torch.long)}
    negative = {"prompt_embeds": torch.randn(1, TEXT_LEN, CAPTION_DIM, generator=gen),
                "prompt_attention_mask": torch.tensor([[1] + [0] * (TEXT_LEN - 1)])}
    return bank, negative


def count_forwards(models) -> tuple[list, list]:
    """Forward pre-hooks on ``models``: (calls, per-call batch sizes) lists, filled as they run."""
    calls, handles = [], []
    for model in models:
        handles.append(model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(
            (args[0] if args else kwargs["hidden_states"]).shape[0]), with_kwargs=True))
    return calls, handles


def pixart(args):
    """tiny_pixart_transformer, or its config with more attention heads (``--heads``: wider layers,
    same depth), to see how the fixed per-module costs weigh as the layers grow."""
    model = tiny_pixart_transformer(args.sample_size)
    if args.heads and args.heads != model.config.num_attention_heads:
        from diffusers import PixArtTransformer2DModel

        torch.manual_seed(0)
        inner = args.heads * model.config.attention_head_dim
        model = PixArtTransformer2DModel.from_config({**model.config, "num_attention_heads": args.heads,
                                                      "cross_attention_dim": inner}).eval()
    return model


def build(args, tmp: str):
    bank, negative = conditions()
    tdm = TDMConfig(num_steps=4, total_steps=900, tau_mode="separate", mid_point="demo", guidance_scale=4.5,
                    generator_loss="huber_elementwise", importance_weighting=True, snr_gamma=5.0)
    config = TrainConfig(output_dir=tmp, max_train_steps=10 ** 6, train_batch_size=args.batch, lora_rank=args.rank,
                         lora_alpha=args.rank, mixed_precision="no", checkpointing_steps=10 ** 6, tdm=tdm)
    backend = PixArtBackend(pixart(args), PIXART_SCHEDULER_CONFIG, negative,
                            resolution=args.sample_size * 8)
    ours = TDMTrainer(backend, bank, config)
    official = OfficialDemoLayout(pixart(args), pixart_eps,
                                  backend.schedule.alphas_cumprod, backend.latent_shape(1)[1:], bank, negative,
                                  total_steps=900, num_steps=4, guidance_scale=4.5, huber=True, separate=True)
    return ours, official


def instrument_ours(trainer: TDMTrainer, timers: Timers) -> None:
    """Time role switches and the phases of train_step from outside (instance attributes only)."""
    roles = trainer.roles
    activate = roles.activate

    def timed_activate(role):
        if role != roles.role:
            timers.calls["effective role switches"] += 1
        with timers("role switching (roles.activate)"):
            activate(role)

    roles.activate = timed_activate
    objective = trainer.objective
    for name, label in (("rollout", "rollout"), ("fake_score_loss", "fake"), ("generator_loss", "generator")):
        method = getattr(objective, name)

        def timed(*a, _method=method, _label=label, **kw):
            with timers(_label):
                return _method(*a, **kw)

        setattr(objective, name, timed)
    # the update of each adapter: backward (+ gradient averaging) of each micro-batch, then the step
    for name in ("_accumulate", "_step"):
        method = getattr(trainer, name)

        def timed_update(*a, _method=method, **kw):
            adapter = kw.get("adapter", a[1] if _method.__name__ == "_accumulate" else a[0])
            with timers("fake_update" if adapter == "fake" else "generator_update"):
                return _method(*a, **kw)

        setattr(trainer, name, timed_update)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds (one iteration each side)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--sample-size", type=int, default=8, help="latent side (8: 64 px, the tests' model)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (tiny model: 3, 8 dims each)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank of ours (the tiny model is 24 wide)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        ours, official = build(args, tmp)
        ours_step = ours.train_step
        official_step = lambda: official.train_step(args.batch)  # noqa: E731

        # forwards and FLOPs over one iteration each
        calls_ours, handles = count_forwards([ours.backend.model])
        with FlopCounterMode(display=False) as counter:
            ours_step()
        flops_ours = counter.get_total_flops()
        for h in handles:
            h.remove()
        calls_official, handles = count_forwards(official.networks)
        with FlopCounterMode(display=False) as counter:
            official_step()
        flops_official = counter.get_total_flops()
        for h in handles:
            h.remove()

        for _ in range(args.warmup):
            ours_step()
            official_step()
        timers_ours, timers_official = Timers(), Timers()
        instrument_ours(ours, timers_ours)
        official.timer = timers_official
        times = {"ours": [], "official": []}
        for r in range(args.rounds):  # ABBA order so that drift hits both sides alike
            order = (("ours", ours_step), ("official", official_step))
            for name, step in (order if r % 2 == 0 else order[::-1]):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)

    med = {k: statistics.median(v) for k, v in times.items()}
    mean = {k: statistics.fmean(v) for k, v in times.items()}
    wall_ratio = med["ours"] / med["official"]
    flop_ratio = flops_ours / flops_official
    n = args.rounds
    width = official.teacher.config.num_attention_heads * official.teacher.config.attention_head_dim
    print(f"TDM iteration, tiny PixArt-alpha transformer ({sum(p.numel() for p in official.teacher.parameters()):,} "
          f"params, width {width}), LoRA rank {args.rank}, latents {args.sample_size}x{args.sample_size}, batch {args.batch}, fp32, "
          f"{args.threads} thread(s), {n} interleaved rounds\n")
    print("| per iteration | ours (TDMTrainer, one base + 2 LoRA) | official demo layout (3 full models) | ours / official |")
    print("|---|---:|---:|---:|")
    print(f"| wall time, median | {med['ours'] * 1e3:.1f} ms | {med['official'] * 1e3:.1f} ms | {wall_ratio:.3f} |")
    print(f"| wall time, mean | {mean['ours'] * 1e3:.1f} ms | {mean['official'] * 1e3:.1f} ms | "
          f"{mean['ours'] / mean['official']:.3f} |")
    print(f"| counted FLOPs (forward + backward) | {flops_ours / 1e6:.2f} M | {flops_official / 1e6:.2f} M | "
          f"{flop_ratio:.3f} |")
    print(f"| network forwards | {len(calls_ours)} | {len(calls_official)} | |")
    print(f"| per-sample network evaluations | {sum(calls_ours) // args.batch} | "
          f"{sum(calls_official) // args.batch} | |")
    verdict = "met" if wall_ratio <= 1.1 * flop_ratio else "NOT met"
    print(f"\nwall-time ratio / FLOP ratio = {wall_ratio / flop_ratio:.3f} (target <= 1.1: {verdict})\n")

    phases = ("rollout", "fake", "fake_update", "generator", "generator_update")
    print("| time split per iteration (mean ms) | ours | official |")
    print("|---|---:|---:|")
    for phase in phases:
        print(f"| {phase} | {timers_ours.seconds[phase] / n * 1e3:.1f} | {timers_official.seconds[phase] / n * 1e3:.1f} |")
    switch = "role switching (roles.activate)"
    print(f"| role switching: all roles.activate calls ({timers_ours.calls[switch] / n:.0f}, of which "
          f"{timers_ours.calls['effective role switches'] / n:.0f} change the role; inside and between the phases) | "
          f"{timers_ours.seconds[switch] / n * 1e3:.1f} | - |")
    other_ours = mean["ours"] - sum(timers_ours.seconds[p] for p in phases) / n
    other_official = mean["official"] - sum(timers_official.seconds[p] for p in phases) / n
    print(f"| rest (batch draw, schedulers, bookkeeping) | {other_ours * 1e3:.1f} | {other_official * 1e3:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
