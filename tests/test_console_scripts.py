"""Every installed console script exits 0 on success and non-zero on failure, and prints no returned value on stderr
(setuptools wraps them as `sys.exit(main())`, which exits 1 and prints a returned dict) (issue 13, item 0).

The commands run as a user runs them, from the PATH of the environment the package is installed in, on tiny models
and data made here; PYTHONPATH points them at this checkout. They run two at a time (their time is mostly imports).
"""

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from .colour_block_data import make_segmentation_dataset
from .conftest import tiny_config
from .random_clip import save_random_clip
from .test_convert import write_checkpoint
from .test_evaluation import save_model_folder
from .test_training import TINY_OVERRIDES


# Every test here runs exports / installed commands in subprocesses: seconds each.
pytestmark = pytest.mark.slow


REPO_ROOT = Path(__file__).resolve().parents[1]
# A value returned by `main` and printed by `sys.exit`: a dict or a list as the last line of stderr.
RETURNED_VALUE = re.compile(r"^(\{.*\}|\[.*\])$")


def command_lines(root: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Command -> (a command line that succeeds, one that fails), on tiny assets written under `root`."""
    clip_dir = save_random_clip(root / "clip")
    model_dir = save_model_folder(root / "model", clip_dir)  # classes cat, dog, grass
    data_dir = make_segmentation_dataset(root / "data", num_train=2, num_validation=2, size=(40, 40))
    PIL.Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(root / "photo.png")
    checkpoint = write_checkpoint(root / "reference.pth")
    truncated = root / "truncated.pth"
    truncated.write_bytes(checkpoint.read_bytes()[:1000])
    tiny_config().save_pretrained(root / "config")
    (root / "occupied").mkdir()
    (root / "occupied" / "notes.txt").write_text("a user's file")
    train = (
        f"--preset voc-inductive --clip_model_name_or_path {clip_dir} --dataset {data_dir} --crop_size 64"
        f" --config_overrides {TINY_OVERRIDES} --per_device_train_batch_size 1 --max_steps 1 --checkpointing_steps 0"
        " --no_final_evaluation"
    )
    benchmark = "--tiny --cases inference-20 --dtypes fp32 --batch_sizes 1 --runs 1 --warmup 0 --threads 1"
    command_lines = {
        "clip-rc-train": (f"{train} --output_dir {root / 'trained'}", f"{train} --output_dir {root / 'occupied'}"),
        "clip-rc-eval": (
            f"--model {model_dir} --dataset {data_dir} --output_dir {root / 'eval'} --no_progress",
            f"--model {root / 'no-model'} --dataset {data_dir} --output_dir {root / 'eval-fail'}",
        ),
        "clip-rc-predict": (
            f"--model {model_dir} {root / 'photo.png'} --output_dir {root / 'predictions'}",
            f"--model {model_dir} {root / 'no-photo.png'} --output_dir {root / 'predictions-fail'}",
        ),
        "clip-rc-convert": (
            f"--checkpoint {checkpoint} --config {root / 'config'} --output_dir {root / 'converted'}",
            f"--checkpoint {truncated} --config {root / 'config'} --output_dir {root / 'failed'}",
        ),
        "clip-rc-flops": (f"{root / 'config'}", "no-such-preset"),
        "clip-rc-benchmark": (benchmark, "--tiny --cases no-such-case"),
    }
    # The train failure: a non-empty output folder is refused. Paths under pytest's tmp_path hold no spaces.
    return {command: (success.split(), failure.split()) for command, (success, failure) in command_lines.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict[tuple[str, str], subprocess.CompletedProcess]]:
    root = tmp_path_factory.mktemp("console_scripts")
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    environment.pop("ACCELERATE_USE_CPU", None)
    jobs = {}
    for command, (succeeding, failing) in command_lines(root).items():
        executable = shutil.which(command)
        assert executable is not None, f"{command} is not installed: pip install -e ."
        jobs[(command, "success")] = [executable, *succeeding]
        jobs[(command, "failure")] = [executable, *failing]

    def run(argv):
        return subprocess.run(argv, cwd=root, env=environment, capture_output=True, text=True, timeout=600)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(jobs, pool.map(run, jobs.values())))
    return root, results


COMMANDS = [
    "clip-rc-train",
    "clip-rc-eval",
    "clip-rc-predict",
    "clip-rc-convert",
    "clip-rc-flops",
    "clip-rc-benchmark",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_success_exits_zero_and_prints_no_returned_value(runs, command):
    _, results = runs
    result = results[(command, "success")]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last_line = (result.stderr.strip().splitlines() or [""])[-1].strip()
    assert not RETURNED_VALUE.match(last_line), last_line


@pytest.mark.parametrize("command", COMMANDS)
def test_failure_exits_non_zero(runs, command):
    _, results = runs
    result = results[(command, "failure")]
    assert result.returncode != 0, result.stderr[-3000:]


def test_the_commands_did_their_work(runs):
    root, results = runs
    assert (root / "trained" / "model.safetensors").is_file() and (root / "converted" / "config.json").is_file()
    assert (root / "eval" / "metrics.json").is_file() and (root / "predictions" / "photo_labels.png").is_file()
    assert "GFLOPs" in results[("clip-rc-flops", "success")].stdout
    assert "inference-20" in results[("clip-rc-benchmark", "success")].stdout
    # The failures say why, and lose nothing.
    assert "is not empty" in results[("clip-rc-train", "failure")].stderr
    assert sorted(path.name for path in (root / "occupied").iterdir()) == ["notes.txt"]
    assert "truncated.pth" in results[("clip-rc-convert", "failure")].stderr
    assert not (root / "failed").exists()
