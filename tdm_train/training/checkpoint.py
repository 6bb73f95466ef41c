"""Training checkpoints that resume exactly: both adapters, both optimizers, LR schedulers and
fp16 loss scalers, every process's RNG, the step and the config, written atomically (temp dir + rename) and rotated.

The official demo saves only the student and restores no weights, so a resumed run silently
restarts from the teacher; here a resumed run continues bit for bit (a test holds us to it).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import torch

from .. import atomic
from ..errors import BadInput, IncompatibleFile, unsafe_pickle

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints (``checkpoint-<step>``), oldest first; temp dirs are ignored."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


SHARED_FILES = ("trainer_state.json", "student.safetensors", "fake.safetensors", "optimizer_student.pt",
                "optimizer_fake.pt", "scheduler_student.pt", "scheduler_fake.pt", "rng_0.pt")


def verify(path: Path) -> None:
    """Raises IncompatibleFile unless ``path`` is a complete checkpoint: every file there, the state
    parseable, every safetensors header and every torch zip archive intact (a cheap check: no
    tensor is read; a truncated or overwritten file fails it)."""
    import zipfile

    from safetensors import safe_open

    missing = [name for name in SHARED_FILES if not (path / name).is_file()]
    if missing:
        raise IncompatibleFile(f"{path} is incomplete: {', '.join(missing)} missing")
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        int(state["step"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise IncompatibleFile(f"{path / 'trainer_state.json'} is corrupt ({error!r})") from None
    for file in sorted(path.iterdir()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), "pt"):
                    pass
            elif file.suffix == ".pt":
                with zipfile.ZipFile(file) as archive:
                    archive.namelist()
        except Exception as error:  # noqa: BLE001 - SafetensorError, BadZipFile, OSError
            raise IncompatibleFile(f"{file} is corrupt or truncated ({error})") from None


def resolve_resume(output_dir: str | Path, resume_from: str | None, warn=None) -> Path | None:
    """``latest`` -> the newest complete checkpoint in output_dir (None when there is none yet);
    one that fails :func:`verify` is skipped, and ``warn(message)`` says which and why. A path ->
    that checkpoint, which must exist and be complete."""
    if not resume_from:
        return None
    if resume_from == "latest":
        candidates = list_checkpoints(output_dir)
        for candidate in reversed(candidates):
            try:
                verify(candidate)
                return candidate
            except IncompatibleFile as error:
                if warn is not None:
                    warn(f"skipping {candidate.name}: {error}; trying the previous checkpoint")
        if candidates:  # starting fresh here would mix a new run with the damaged one
            raise IncompatibleFile(f"none of the {len(candidates)} checkpoints in {output_dir} is complete (see "
                                   "above): nothing to resume. Start over with --overwrite_output_dir, or choose "
                                   "another --output_dir")
        return None
    path = Path(resume_from)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / resume_from
    if not (path / "trainer_state.json").is_file():
        raise BadInput(f"--resume_from_checkpoint {resume_from}: no checkpoint at {path} (a checkpoint-<step> "
                       "folder, or latest)")
    verify(path)
    return path


def differences(state: dict, expected: dict) -> list[str]:
    """What makes the checkpoint (its trainer_state.json) another run than ``expected``: the
    backbone, the denoiser's architecture, the LoRA shape. Keys missing from an older checkpoint
    are not compared."""
    config = state.get("config", {})
    found = {"backbone": state.get("backend"), "lora_rank": config.get("lora_rank"),
             "lora_alpha": config.get("lora_alpha"), "lora_target_modules": config.get("lora_target_modules"),
             "unify_steps": config.get("tdm", {}).get("unify_steps")}
    out = []
    for key, want in expected.items():
        if key == "model_config":
            have = state.get("model_config")
            if have is None or want is None:
                continue
            changed = sorted(k for k in set(have) | set(want) if not k.startswith("_") and have.get(k) != want.get(k))
            if changed:
                out.append("the denoiser differs in " + ", ".join(f"{k} ({have.get(k)} there, {want.get(k)} here)"
                                                                   for k in changed[:5]))
            continue
        have = found.get(key)
        if have is None and key != "unify_steps":
            continue
        if isinstance(have, (list, tuple)) or isinstance(want, (list, tuple)):
            have, want = (list(have) if have is not None else None), (list(want) if want is not None else None)
        if have != want:
            out.append(f"{key} {have} there, {want} here")
    return out


def model_config(model) -> dict | None:
    """The denoiser's diffusers config as JSON values (recorded in checkpoints, compared on resume)."""
    config = getattr(model, "config", None)
    try:
        return json.loads(json.dumps(dict(config), default=str)) if config is not None else None
    except (TypeError, ValueError):  # not a diffusers model (e.g. one ComfyUI loaded)
        return None


def rotate(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints so that at most ``total_limit`` remain (None: keep all)."""
    if total_limit is None:
        return []
    if total_limit < 1:
        raise BadInput(f"checkpoints_total_limit {total_limit}: keep at least 1 checkpoint (or None: all)")
    checkpoints = list_checkpoints(output_dir)
    removed = checkpoints[: max(len(checkpoints) - total_limit, 0)]
    for path in removed:
        shutil.rmtree(path)
    return removed


def write_shared(tmp_dir: Path, adapters: dict, optimizers: dict, schedulers: dict, state: dict,
                 scalers: dict | None = None, history: list | None = None) -> None:
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
    if history is not None:  # the log up to this step: a resumed run's train_history.json continues it
        atomic.write_text(tmp_dir / "train_history.json", json.dumps(history))
    atomic.write_text(tmp_dir / "trainer_state.json", json.dumps(state, indent=2))


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

    verify(path)
    state = json.loads((path / "trainer_state.json").read_text())
    rng_file = path / f"rng_{rank}.pt"
    if not rng_file.is_file():
        raise IncompatibleFile(
            f"{path} has no RNG state for process {rank}: it was written by a run with fewer processes"
        )

    def pt(file: Path):
        try:
            return torch.load(file, weights_only=True)
        except pickle.UnpicklingError as error:  # the weights-only loader refused it
            raise unsafe_pickle(file, error) from None
        except Exception as error:  # noqa: BLE001 - a damaged archive
            raise IncompatibleFile(f"{file} is corrupt ({error})") from None

    history_file = path / "train_history.json"
    return {
        "state": state,
        "adapters": {p.stem: load_file(str(p)) for p in path.glob("*.safetensors")},
        "optimizers": {name: pt(path / f"optimizer_{name}.pt") for name in ("student", "fake")},
        "schedulers": {name: pt(path / f"scheduler_{name}.pt") for name in ("student", "fake")},
        "scalers": {name: pt(path / f"scaler_{name}.pt")
                    for name in ("student", "fake") if (path / f"scaler_{name}.pt").is_file()},
        "rng": pt(rng_file),
        "history": json.loads(history_file.read_text()) if history_file.is_file() else None,
    }
