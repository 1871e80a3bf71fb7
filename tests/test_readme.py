"""The README's Python examples, run as written, with local tiny models in place of the Hub names and paths."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .random_clip import save_random_clip
from .test_evaluation import save_model_folder


README = Path(__file__).resolve().parents[1] / "README.md"


def python_examples(section: str) -> list[str]:
    """The ```python blocks of a `## section` of the README."""
    text = README.read_text(encoding="utf-8")
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.DOTALL)


@pytest.fixture(scope="module")
def replacements(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    clip_dir = save_random_clip(root / "clip")
    model_dir = save_model_folder(root / "model", clip_dir)
    photo = root / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 130, 3), dtype=np.uint8)).save(photo)
    return {
        "runs/voc-inductive": str(model_dir),
        "openai/clip-vit-base-patch16": str(clip_dir),
        "photo.jpg": str(photo),
    }


def run_example(code: str, replacements: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    for name, local in replacements.items():
        code = code.replace(f'"{name}"', repr(local))
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment.update(HF_HUB_OFFLINE="1", HF_HOME=str(cwd / "hf_home"))
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=environment, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_the_use_section_examples_run_as_written(replacements, tmp_path):
    examples = python_examples("Use")
    assert len(examples) == 3, "the README's Use section changed: update this test"
    outputs = []
    for code in examples:
        assert "model.segment" not in code and "sliding_window" not in code  # the standard path only
        result = run_example(code, replacements, tmp_path)
        assert result.returncode == 0, f"{code}\n{result.stderr[-3000:]}"
        outputs.append(result.stdout)
    # The first example prints the classes it found: names of the model's classes.
    assert set(re.findall(r"'(\w+)'", outputs[0])) <= {"cat", "dog", "grass"} and outputs[0].strip()


def test_what_is_where_names_every_module_and_only_existing_files():
    """The README's "What is where" tables match the tree: each file they name exists, and each module of the
    package (and each script of `benchmarks/`) is named. Bare names are files of `clip_rc/commands/`, `clip_rc/toy/` or the top folder."""
    root = README.parent
    section = README.read_text().split("## What is where", 1)[1].split("\n## ", 1)[0]
    named = set()
    for token in re.findall(r"`([\w./-]+\.py|[\w/]+/)`", section):
        if "/" in token:
            paths = [root / token]
        else:
            folders = (root / "clip_rc" / "commands", root / "clip_rc" / "toy", root)
            paths = [folder / token for folder in folders if (folder / token).exists()]
        assert paths and all(path.exists() for path in paths), (
            f"README's What is where names {token}, which is not in the tree"
        )
        named.update(path.resolve() for path in paths)
    modules = [path for path in root.glob("clip_rc/**/*.py") if path.name != "__init__.py"] + list(
        root.glob("benchmarks/*.py")
    )
    missing = [
        str(path.relative_to(root))
        for path in modules
        if path.resolve() not in named and path.parent.resolve() not in named
    ]
    assert not missing, f"modules missing from README's What is where: {missing}"
