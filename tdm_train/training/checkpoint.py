"""Training checkpoints that resume exactly: both adapters, both optimizers, LR schedulers and
fp16 loss scalers, every process's RNG, the step and the config, written atomically (temp dir + rename) and rotated.

The official demo saves only the student and restores no weights, so a resumed run silently
restarts from the teacher; here a resumed run continues bit for bit (a test holds us to it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from .. import atomic

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints (``checkpoint-<step>``), oldest first; temp dirs are ignored."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(output_dir: str | Path, resume_from: str | None) -> Path | None:
    """``latest`` -> the newest checkpoint in output_dir (None when there is none yet); a path ->
    that checkpoint, which must exist."""
    if not resume_from:
        return None
    if resume_from == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / resume_from
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume_from}: no checkpoint at {path}")
    return path


def rotate(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints so that at most ``total_limit`` remain (None: keep all)."""
    if total_limit is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    removed = checkpoints[: max(len(checkpoints) - total_limit, 0)]
    for path in removed:
        shutil.rmtree(path)
    return removed


def write_shared(tmp_dir: Path, adapters: dict, optimizers: dict, schedulers: dict, state: dict,
                 scalers: dict | None = None) -> None:
    """The parts every process shares (written by the main process). ``scalers``: the fp16
    GradScalers (a disabled one has an empty state and is not written)."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    for name, tensors in adapters.items():
        atomic.save_safetensors(tensors, tmp_dir / f"{name}.safetensors")
    for name, optimizer in optimizers.items():
        atomic.torch_save(optimizer.state_dict(), tmp_dir / f"optimizer_{name}.pt")
    for name, scheduler in schedulers.items():
        atomic.torch_save(scheduler.state_dict(), tmp_dir / f"scheduler_{name}.pt")
    for name, scaler in (scalers or {}).items():
        if scaler.is_enabled():
            atomic.torch_save(scaler.state_dict(), tmp_dir / f"scaler_{name}.pt")
    (tmp_dir / "trainer_state.json").write_text(json.dumps(state, indent=2))


def write_rng(tmp_dir: Path, rank: int, generator: torch.Generator) -> None:
    """Each process's own random state (its data/noise generator and torch's global RNG)."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    atomic.torch_save({"generator": generator.get_state(), "torch": torch.get_rng_state()}, tmp_dir / f"rng_{rank}.pt")


def finalize(tmp_dir: Path, final_dir: Path) -> None:
    """Publish a fully written checkpoint with one rename."""
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)


def load(path: Path, rank: int) -> dict:
    """Everything a checkpoint holds, for process ``rank``. Only weights-only loading is used."""
    from safetensors.torch import load_file

    state = json.loads((path / "trainer_state.json").read_text())
    rng_file = path / f"rng_{rank}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(
            f"{path} has no RNG state for process {rank}: it was written by a run with fewer processes"
        )
    return {
        "state": state,
        "adapters": {p.stem: load_file(str(p)) for p in path.glob("*.safetensors")},
        "optimizers": {name: torch.load(path / f"optimizer_{name}.pt", weights_only=True) for name in ("student", "fake")},
        "schedulers": {name: torch.load(path / f"scheduler_{name}.pt", weights_only=True) for name in ("student", "fake")},
        "scalers": {name: torch.load(path / f"scaler_{name}.pt", weights_only=True)
                    for name in ("student", "fake") if (path / f"scaler_{name}.pt").is_file()},
        "rng": torch.load(rng_file, weights_only=True),
    }
