"""What 'nothing on disk changed' compares: every path under some folders with its kind, size and
modification time."""

from pathlib import Path


def snapshot(*folders) -> dict:
    state = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")) if Path(folder).exists() else ():
            stat = path.stat()
            state[str(path)] = (path.is_dir(), stat.st_size, stat.st_mtime_ns)
    return state
