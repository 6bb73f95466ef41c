"""Installs requirements.txt into the Python that runs this file (ComfyUI-Manager runs it after
cloning the pack). It never installs, upgrades or replaces torch: ComfyUI users already have
the build that matches their GPU."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parent / "requirements.txt"
# torch and its companions (torchvision, torchaudio) must come from the user's own CUDA/ROCm/CPU install.
PROTECTED = re.compile(r"^torch(vision|audio)?$")


def requirement_lines(path: Path = REQUIREMENTS) -> list[str]:
    """The requirement specifiers of ``path``, comments and blanks dropped. Refuses a file that
    names a protected package rather than silently replacing the user's torch."""
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name = re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0].lower()
        if PROTECTED.match(name):
            raise SystemExit(f"{path} names {name!r}; refusing to touch the torch that ComfyUI runs on")
        lines.append(line)
    return lines


def main() -> int:
    requirements = requirement_lines()
    if not requirements:
        return 0
    command = [sys.executable, "-m", "pip", "install", *requirements]
    print("ComfyUI-TDM:", " ".join(command), flush=True)
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
