"""Small helpers shared by the scripts: strict, atomic JSON files and launcher detection."""

import contextlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch


__all__ = ["atomic_path", "json_ready", "launched_without_accelerator", "setup_logging", "write_json_atomic", "write_text_atomic"]


def json_ready(value: Any) -> Any:
    """Arrays -> lists, numpy scalars -> Python numbers, paths -> strings, NaN / inf -> `None` (strict JSON),
    recursively."""
    if isinstance(value, Mapping):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return [json_ready(item) for item in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """
    Yield a temporary path in the folder of `path` to write the file to; on success it replaces `path` at once
    (`os.replace`), on failure it is removed. So `path` is always either the old file or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(descriptor)
    try:
        yield Path(temporary)
        # mkstemp creates the file readable by its owner only; give it the permissions of a normally created file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (see [`atomic_path`]), flushed to disk before it replaces the old file."""
    with atomic_path(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write `data` as JSON (see [`json_ready`]) to `path` atomically (see [`write_text_atomic`])."""
    return write_text_atomic(path, json.dumps(json_ready(data), indent=2, allow_nan=False) + "\n")


def launched_without_accelerator() -> bool:
    """True when a launcher started several processes (WORLD_SIZE > 1) and no GPU / accelerator is available."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        world_size = 1
    return world_size > 1 and not torch.accelerator.is_available()


def setup_logging(is_main_process: bool = True):
    """Show this package's messages on the terminal through one root handler (a no-op when the program already has
    one, so scripts that call each other never print a message twice): INFO on the main process, warnings on the
    others."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("clip_rc").setLevel(logging.INFO if is_main_process else logging.WARNING)
