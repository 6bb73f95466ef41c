"""The errors a user can cause, and the one table of exit codes of `python -m tdm_train` and
`python -m export.trt`.

Every failure the input alone explains is one paragraph on stderr and a distinct exit code, never
a traceback: a traceback means a bug of ours. Foreign exceptions that come from the user's files
or machine (a disk that is full, a folder that is read-only, a safetensors file that is cut short,
a pickle the weights-only loader refuses) are translated by :func:`explain`.

  0  done
  1  an export is out of tolerance (validation failed; the figures are in engine.json)
  2  bad input: a flag or config value, a missing required input (the message names the flag)
  3  an incompatible or corrupt file: model folder, LoRA, checkpoint, ONNX, engine.json, pickle
  4  output refused: the folder holds a run or an export, is a file, is read-only, or the disk is full
  5  a missing package or device (the message says what to install)
  6  non-finite numbers: training stopped on NaN/inf losses, or an output that is not finite
"""

from __future__ import annotations

import errno
import pickle
import sys

EXIT_OK = 0
EXIT_TOLERANCE = 1
EXIT_BAD_INPUT = 2
EXIT_BAD_FILE = 3
EXIT_OUTPUT = 4
EXIT_MISSING = 5
EXIT_NONFINITE = 6


class ToolError(Exception):
    """A failure explained by the user's input, files or machine: shown as ``error: <message>``."""

    exit_code = EXIT_BAD_INPUT


class BadInput(ToolError, ValueError):
    """A flag or config value out of range or inconsistent; the message names the flag, the value
    and what is accepted."""

    exit_code = EXIT_BAD_INPUT


class IncompatibleFile(ToolError, ValueError):
    """A file that is corrupt, truncated, not a safe format, or made for another model."""

    exit_code = EXIT_BAD_FILE


class OutputRefused(ToolError, OSError):
    """The output cannot be written without losing something (or at all)."""

    exit_code = EXIT_OUTPUT


class MissingDependency(ToolError, RuntimeError):
    """An optional package or a device that a command needs is not there; the message says how to get it."""

    exit_code = EXIT_MISSING


class NonFinite(ToolError, RuntimeError):
    """NaN or inf where numbers must be finite (losses, weights, outputs)."""

    exit_code = EXIT_NONFINITE


def unsafe_pickle(path, error: Exception) -> IncompatibleFile:
    """torch's weights-only loader refused a pickle. Its own message advises retrying with
    ``weights_only=False``, which would run whatever code the file holds: it is never passed on;
    only the object the pickle asked for is named."""
    import re

    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    what = f"it asks for {found.group(1)}, " if found else ""
    return IncompatibleFile(
        f"{path}: not a safe format. It is a pickle holding more than tensors and plain containers ({what}refused by "
        "the safe loader); it was not executed. Get a .safetensors file, or re-create the file with this tool.")


def read_json_object(path, what: str) -> dict:
    """A JSON object from one of the user's files (configs, indexes); anything else is an
    IncompatibleFile naming the file and ``what`` it is."""
    import json

    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise IncompatibleFile(f"{path} is not valid JSON ({error}): {what}") from None
    except UnicodeDecodeError:
        raise IncompatibleFile(f"{path} is not a text file: {what}") from None
    if not isinstance(data, dict):
        raise IncompatibleFile(f"{path}: expected a JSON object ({what})")
    return data


def _is_safetensors_error(error: BaseException) -> bool:
    return type(error).__name__ == "SafetensorError" or "safetensors" in type(error).__module__


def explain(error: BaseException) -> tuple[int, str] | None:
    """(exit code, one-paragraph message) for an error the user's input or machine explains;
    None for anything else (a bug: let its traceback show)."""
    if isinstance(error, ToolError):
        return error.exit_code, str(error)
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = f" while writing {error.filename}" if error.filename else ""
        return EXIT_OUTPUT, (f"the disk is full{where}. Files are written beside their target and renamed into "
                             "place, so nothing already there was replaced by a half-written file; free space and "
                             "run again (a training run resumes with --resume_from_checkpoint latest)")
    if isinstance(error, PermissionError):
        return EXIT_OUTPUT, f"permission denied: {error.filename or error} (is the folder read-only?)"
    if isinstance(error, pickle.UnpicklingError):
        return EXIT_BAD_FILE, str(unsafe_pickle("a file", error))
    if _is_safetensors_error(error):
        return EXIT_BAD_FILE, f"a .safetensors file is corrupt or truncated ({error})"
    if isinstance(error, FileNotFoundError):
        return EXIT_BAD_INPUT, str(error)
    if isinstance(error, ValueError):
        return EXIT_BAD_INPUT, str(error)
    return None


def run_cli(main, argv=None) -> int:
    """Run ``main(argv)``; an error :func:`explain` knows becomes ``error: ...`` on stderr and its
    exit code (Ctrl-C: 130)."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - translated or re-raised
        known = explain(error)
        if known is None:
            raise
        code, message = known
        print(f"error: {message}", file=sys.stderr)
        return code
