"""Small helpers shared by the scripts: strict, atomic JSON files, launcher detection, and checks of model folders
and weights whose errors name the file or the tensors."""

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch


__all__ = [
    "atomic_output_dir",
    "atomic_path",
    "check_model_folder",
    "json_ready",
    "load_clip_rc_config",
    "missing_weights",
    "launched_without_accelerator",
    "non_finite_tensors",
    "setup_logging",
    "write_json_atomic",
    "write_text_atomic",
]


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


def non_finite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of `tensors` (a state dict) that hold a NaN or an infinity."""
    return [
        name
        for name, tensor in tensors.items()
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def check_model_folder(path: str | os.PathLike) -> Path:
    """
    Check a local model folder before `from_pretrained` reads it, so that a broken folder gives an error naming the
    file: `config.json` must exist and be a JSON object with a `model_type`, and every safetensors weight file (those
    of a `model.safetensors.index.json` included) must exist and be complete.

    Raises:
        `FileNotFoundError`: the folder, its `config.json` or a weight file is missing.
        `ValueError`: `config.json` is not valid, or a weight file is truncated or corrupt.
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"Model folder {folder} does not exist (or is not a folder).")
    config_file = folder / "config.json"
    if not config_file.is_file():
        found = sorted(entry.name for entry in folder.iterdir())[:10]
        raise FileNotFoundError(
            f"{folder} holds no config.json, so it is not a model folder saved with save_pretrained (it holds: "
            f"{', '.join(found) or 'nothing'})."
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_file} is not valid JSON ({error}).") from error
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"{config_file} is not a model configuration: it has no `model_type` key.")
    weight_files = sorted(folder.glob("*.safetensors"))
    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{index_file} is not a valid safetensors index ({error}).") from error
        weight_files = sorted({folder / name for name in weight_map.values()} | set(weight_files))
    for weight_file in weight_files:
        if not weight_file.is_file():
            raise FileNotFoundError(f"Weight file {weight_file} (listed in {index_file}) is missing.")
        try:
            with safe_open(str(weight_file), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ValueError(f"Weight file {weight_file} is truncated or corrupt ({error}).") from error
    return folder


def load_clip_rc_config(path: str | os.PathLike):
    """
    A [`CLIPRCConfig`] from a `config.json` file or a model folder holding one, with errors that name the file: a
    missing file, invalid JSON or an invalid value (the config's own message names the field and the value).
    """
    from .configuration_clip_rc import CLIPRCConfig

    path = Path(path)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        where = f"{path} holds no config.json" if path.is_dir() else f"{path} does not exist"
        raise FileNotFoundError(f"No CLIP-RC configuration: {where}.")
    try:
        return CLIPRCConfig.from_json_file(str(config_file))
    except (UnicodeDecodeError, ValueError, TypeError) as error:  # invalid JSON is a ValueError too
        raise ValueError(f"{config_file} is not a valid CLIP-RC configuration: {error}") from error


def missing_weights(folder: str | os.PathLike, model: torch.nn.Module) -> list[str]:
    """Names of the state-dict entries of `model` that the safetensors files of `folder` do not hold: those a
    `from_pretrained` of the folder initialised afresh instead of loading."""
    from safetensors import safe_open

    stored = set()
    for weight_file in Path(folder).glob("*.safetensors"):
        with safe_open(str(weight_file), framework="pt") as handle:
            stored.update(handle.keys())
    return sorted(set(model.state_dict()) - stored)


@contextlib.contextmanager
def atomic_output_dir(target: str | os.PathLike, replace_other_files: bool = False):
    """
    Yield a fresh temporary sibling of `target` to write into; on success it replaces `target` (an existing folder
    is swapped out and removed only after the new one is in place); on failure it is deleted and `target` is left
    untouched. An existing folder holding files the new one does not (a user's files, another model's) is not
    replaced unless `replace_other_files` (the user asked to overwrite it): that is an error listing them.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder.")
    target.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    temporary = target.with_name(f".{target.name}.partial-{token}")
    temporary.mkdir()
    try:
        yield temporary
        if target.exists() and not replace_other_files:
            extra = sorted({entry.name for entry in target.iterdir()} - {entry.name for entry in temporary.iterdir()})
            if extra:
                raise FileExistsError(
                    f"{target} already holds files this run does not write ({', '.join(extra[:10])}); replacing "
                    "the folder would delete them. Move them away or choose another output folder."
                )
        backup = None
        if target.exists():
            backup = target.with_name(f".{target.name}.old-{token}")
            os.rename(target, backup)
        try:
            os.rename(temporary, target)
        except OSError:
            if backup is not None:
                os.rename(backup, target)
            raise
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
