"""Atomic file writes: write next to the target, then one rename, so a reader (or a resumed run)
never sees a half-written file. Every file the project writes goes through here."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so writers that infer the format from it
    work); on success it replaces ``path`` in one rename, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def check_writable_folder(folder: str | Path, what: str) -> None:
    """``folder`` is (or can become) a folder this process can write in; ``what`` names it in the
    error (e.g. "--output_dir"). A probe file is created and removed: nothing is left behind."""
    import tempfile

    from .errors import OutputRefused

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputRefused(f"{what} {folder} is a file, not a folder: choose another path")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputRefused(f"{what} {folder}: {existing} is a file, not a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=".tdm-write-probe-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise OutputRefused(f"{what} {folder}: cannot write in {existing} ({error.strerror}): choose a writable "
                            "folder") from None


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def torch_save(obj, path: str | Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
