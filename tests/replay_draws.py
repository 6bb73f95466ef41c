"""Record the random draws a TDMTrainer makes, and replay them concatenated into a bigger batch.

Why: "N micro-batches of B equal one batch of N*B" (and "2 processes x B equal 1 process x 2B")
holds only if the big batch sees the same samples, noise, k, tau and z as the small ones together;
drawn from one generator, a batch of N*B gets different numbers than N batches of B. So the small
run is recorded, and the reference run is fed, draw by draw, the concatenation of the matching
draws of the small run(s).

The trainer's draws fall into segments: a *fake* segment starts at each ``trainer._batch()`` (the
batch, its noise, then the fake loss's k, tau, z) and a *generator* segment at each
``objective.generator_loss`` call (its k, tau, z). Only draws from the trainer's own generator are
touched.
"""

from __future__ import annotations

import contextlib

import torch

RANDOM_FUNCTIONS = ("rand", "randn", "randint")


@contextlib.contextmanager
def _patched_draws(trainer, on_draw):
    originals = {name: getattr(torch, name) for name in RANDOM_FUNCTIONS}

    def wrap(name):
        def draw(*args, **kwargs):
            if kwargs.get("generator") is not trainer.generator:
                return originals[name](*args, **kwargs)
            return on_draw(name, originals[name], args, kwargs)
        return draw

    for name in RANDOM_FUNCTIONS:
        setattr(torch, name, wrap(name))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)


@contextlib.contextmanager
def _segments(trainer, start_segment):
    """Call ``start_segment(kind)`` whenever the trainer begins a fake or a generator segment."""
    batch, generator_loss = trainer._batch, trainer.objective.generator_loss

    def marked_batch(*a, **k):
        start_segment("fake")
        return batch(*a, **k)

    def marked_generator_loss(*a, **k):
        start_segment("generator")
        return generator_loss(*a, **k)

    trainer._batch, trainer.objective.generator_loss = marked_batch, marked_generator_loss
    try:
        yield
    finally:
        del trainer._batch, trainer.objective.generator_loss  # back to the class / bound originals


@contextlib.contextmanager
def recording(trainer, segments: list):
    """Append ``(kind, [draws...])`` to ``segments`` for every segment the trainer runs."""
    def start(kind):
        segments.append((kind, []))

    def on_draw(name, fn, args, kwargs):
        value = fn(*args, **kwargs)
        segments[-1][1].append((name, value.clone()))
        return value

    with _segments(trainer, start), _patched_draws(trainer, on_draw):
        yield segments


@contextlib.contextmanager
def replaying(trainer, groups: list[list]):
    """The reference run's i-th segment gets, draw by draw, the concatenation (dim 0) of the draws
    of the recorded segments ``groups[i]``; shapes, dtypes and kinds are checked."""
    position = {"segment": -1, "draw": 0}

    def start(kind):
        position["segment"] += 1
        position["draw"] = 0
        group = groups[position["segment"]]
        assert all(k == kind for k, _ in group), f"segment {position['segment']}: {kind} vs {[k for k, _ in group]}"

    def on_draw(name, fn, args, kwargs):
        group = groups[position["segment"]]
        parts = [draws[position["draw"]] for _, draws in group]
        position["draw"] += 1
        assert all(n == name for n, _ in parts), (name, [n for n, _ in parts])
        value = torch.cat([v for _, v in parts])
        expected = fn(*args, **kwargs)  # the shape and dtype the reference asks for
        assert value.shape == expected.shape and value.dtype == expected.dtype, (value.shape, expected.shape)
        return value.to(expected.device)

    with _segments(trainer, start), _patched_draws(trainer, on_draw):
        yield
    assert position["segment"] == len(groups) - 1, f"replayed {position['segment'] + 1} of {len(groups)} segments"


def record_gradients(trainer) -> dict[str, list[torch.Tensor]]:
    """Every gradient each optimizer applies (flattened, per step), taken just before its step,
    i.e. after accumulation, averaging over processes, unscaling and clipping."""
    applied: dict[str, list[torch.Tensor]] = {name: [] for name in trainer.optimizers}

    def hook(optimizer, args, kwargs, name):
        applied[name].append(torch.cat([p.grad.detach().reshape(-1).clone()
                                        for group in optimizer.param_groups for p in group["params"]]))

    for name, optimizer in trainer.optimizers.items():
        optimizer.register_step_pre_hook(lambda o, a, k, name=name: hook(o, a, k, name))
    return applied
