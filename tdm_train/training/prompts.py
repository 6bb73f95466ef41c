"""Prompt files for data-free TDM training: .txt (one per line), .jsonl (a text field), .csv (a
column). Only prompts are needed: TDM never sees an image."""

from __future__ import annotations

import csv
import json
from pathlib import Path

TEXT_FIELDS = ("text", "prompt", "caption")


def read_prompts(path: str | Path, column: str | None = None) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    suffix = path.suffix.lower()
    if column and suffix == ".txt":
        raise ValueError(f"--prompt_column {column!r}: a .txt prompt file has no columns (one prompt per line); "
                         "it applies to .jsonl and .csv files")
    try:
        return _read(path, suffix, column)
    except UnicodeDecodeError as error:
        raise ValueError(f"--prompts {path}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def _read(path: Path, suffix: str, column: str | None) -> list[str]:
    if suffix == ".txt":
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    elif suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
            prompts.append(_field(record, column, f"{path}:{number}"))
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            prompts = [_field(row, column, f"{path}:{number}") for number, row in enumerate(reader, 2)]
    else:
        raise ValueError(f"--prompts {path}: expected a .txt, .jsonl or .csv file")
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts found")
    return prompts


def _field(record: dict, column: str | None, where: str) -> str:
    names = (column,) if column else TEXT_FIELDS
    for name in names:
        if name in record and isinstance(record[name], str):
            return record[name]
    raise ValueError(f"{where}: no {' / '.join(names)} field (set --prompt_column)")
