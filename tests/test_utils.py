"""Shared helpers of the scripts."""

import json
import os

import numpy as np
import pytest

from clip_rc.utils import json_ready, launched_without_accelerator, write_json_atomic


def test_json_helpers(tmp_path):
    record = json_ready({"a": np.array([0.5, np.nan]), "b": np.float32(0.25), "c": float("nan"), "d": [np.int64(3)]})
    assert record == {"a": [0.5, None], "b": 0.25, "c": None, "d": [3]}
    path = write_json_atomic(tmp_path / "sub" / "metrics.json", record)
    assert json.loads(path.read_text()) == record
    assert os.stat(path).st_mode & 0o044  # readable by others, like a normally created file
    assert [entry.name for entry in path.parent.iterdir()] == ["metrics.json"]
    with pytest.raises(TypeError):
        write_json_atomic(path, {"x": object()})  # not serialisable: refused, and the old file is kept
    assert json.loads(path.read_text()) == record
    assert [entry.name for entry in path.parent.iterdir()] == ["metrics.json"]


def test_launcher_detection(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched_without_accelerator()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not launched_without_accelerator()
