"""Replacing an export without ever losing the good one: the new export is written beside the old
folder and swapped in with two renames only once it validated."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from .validate import ValidationFailed


@contextlib.contextmanager
def staged_export(out_dir: Path, replacing: bool):
    """Where an export is written. Into ``out_dir`` itself when it holds no export; else beside it
    (``<out-dir>.partial``), swapped in with two renames only once it validated. A replacement that
    fails validation is kept as ``<out-dir>.failed`` for inspection and the previous export stays."""
    if not replacing:
        yield out_dir
        return
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        yield staging
    except ValidationFailed as error:
        failed = out_dir.with_name(out_dir.name + ".failed")
        shutil.rmtree(failed, ignore_errors=True)
        os.replace(staging, failed)
        raise ValidationFailed(f"{error}. The previous export in {out_dir} is unchanged; the failed one is in "
                               f"{failed} for inspection") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = out_dir.with_name(out_dir.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    os.replace(out_dir, previous)
    os.replace(staging, out_dir)
    shutil.rmtree(previous, ignore_errors=True)
