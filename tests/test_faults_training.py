"""Training never loses a user's files, never saves non-finite weights and never resumes inexactly without being told
(issue 13, items 1, 3 and 7), on a tiny CLIP and synthetic data."""

import hashlib
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clip_rc.commands import train as training
from clip_rc.commands.train import OWNER_MARKER, TrainingDivergedError, list_checkpoints

from .colour_block_data import make_segmentation_dataset
from .random_clip import save_random_clip
from .test_training import run_args


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return save_random_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    return make_segmentation_dataset(
        tmp_path_factory.mktemp("synthetic"), num_train=6, num_validation=2, size=(64, 64), class_ids=[0, 1, 15]
    )


@pytest.fixture(autouse=True)
def _single_thread_and_fresh_accelerate_state():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    reset_accelerate()


def quick_args(clip_dir, data_dir, output_dir, *extra, batch_size=2):
    return run_args(clip_dir, data_dir, output_dir, "--max_steps", "2", "--warmup_steps", "0", "--no_final_evaluation",
                    *extra, batch_size=batch_size)  # fmt: skip


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under `folder`."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


# ---- the output folder ----------------------------------------------------------------------------------------------


def test_a_finished_model_or_user_files_are_never_replaced_without_overwrite(tiny_clip_dir, dataset_dir, tmp_path):
    finished = tmp_path / "finished"
    training.train(quick_args(tiny_clip_dir, dataset_dir, finished))
    reset_accelerate()
    assert (finished / "config.json").is_file() and not list_checkpoints(finished)
    before = snapshot(finished)
    for extra in ((), ("--resume_from_checkpoint", "latest")):  # no checkpoint to resume: a fresh start
        with pytest.raises(ValueError, match=f"{finished} is not empty .*config.json.*--overwrite_output_dir"):
            training.train(quick_args(tiny_clip_dir, dataset_dir, finished, *extra))
        reset_accelerate()
    assert snapshot(finished) == before

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"is not empty \(it holds todo.txt\)"):
        training.train(quick_args(tiny_clip_dir, dataset_dir, notes))
    assert snapshot(notes) == {"todo.txt": hashlib.sha256(b"mine").hexdigest()}


def test_overwrite_keeps_a_users_readme_and_temporary_looking_files(tiny_clip_dir, dataset_dir, tmp_path):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "README.md").write_text("# My notes about this experiment\n")
    (output_dir / ".tmp-mine.txt").write_text("a user file named like a temporary one")
    (output_dir / ".tmp-data").mkdir()
    (output_dir / ".tmp-data" / "x.bin").write_bytes(b"\x00\x01")
    # A folder an interrupted run of the training module left: marked, so removed.
    (output_dir / ".tmp-final").mkdir()
    (output_dir / ".tmp-final" / OWNER_MARKER).write_text("")
    users = {name: digest for name, digest in snapshot(output_dir).items() if not name.startswith(".tmp-final")}

    result = training.train(quick_args(tiny_clip_dir, dataset_dir, output_dir, "--overwrite_output_dir"))
    assert result["global_step"] == 2
    after = snapshot(output_dir)
    assert {name: after[name] for name in users} == users  # README.md, .tmp-mine.txt, .tmp-data/x.bin untouched
    assert not (output_dir / ".tmp-final").exists()
    assert (output_dir / "config.json").is_file() and (output_dir / "model.safetensors").is_file()

    # A second overwrite replaces the model card this module wrote, and keeps the user's README.md again.
    (output_dir / "README.md").unlink()
    reset_accelerate()
    training.train(quick_args(tiny_clip_dir, dataset_dir, output_dir, "--overwrite_output_dir"))
    assert training.MODEL_CARD_MARKER in (output_dir / "README.md").read_text()
    reset_accelerate()
    training.train(quick_args(tiny_clip_dir, dataset_dir, output_dir, "--overwrite_output_dir", "--seed", "3"))
    assert '"train.seed": 3' in (output_dir / "README.md").read_text()


def test_a_user_folder_named_like_a_temporary_one_is_refused_not_deleted(tiny_clip_dir, dataset_dir, tmp_path):
    output_dir = tmp_path / "run"
    (output_dir / ".tmp-checkpoint-2").mkdir(parents=True)
    (output_dir / ".tmp-checkpoint-2" / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match=r"holds \['.tmp-checkpoint-2'\], named like the temporary folders"):
        training.train(quick_args(tiny_clip_dir, dataset_dir, output_dir, "--overwrite_output_dir"))
    assert (output_dir / ".tmp-checkpoint-2" / "keep.txt").read_text() == "user data"


# ---- non-finite numbers -------------------------------------------------------------------------------------------


def test_a_diverging_run_stops_and_saves_no_non_finite_weights(tiny_clip_dir, dataset_dir, tmp_path):
    output_dir = tmp_path / "diverged"
    args = run_args(tiny_clip_dir, dataset_dir, output_dir, "--max_steps", "6", "--warmup_steps", "0",
                    "--learning_rate", "1e12", "--checkpointing_steps", "1", "--no_final_evaluation")  # fmt: skip
    diverged = r"The loss is not finite at iteration (\d+) \(loss=(nan|inf)"
    with pytest.raises(TrainingDivergedError, match=diverged) as raised:
        training.train(args)
    stopped_at = int(re.search(r"iteration (\d+)", str(raised.value)).group(1))
    assert not (output_dir / "config.json").exists() and not (output_dir / "model.safetensors").exists()
    checkpoints = list_checkpoints(output_dir)
    # Every update before the divergence was checkpointed (lr 1e13 blows the weights up in one update).
    assert [path.name for path in checkpoints] == [f"checkpoint-{step}" for step in range(1, stopped_at)] != []
    for checkpoint in checkpoints:
        weights = load_file(str(checkpoint / "model.safetensors"))
        assert all(torch.isfinite(tensor).all() for tensor in weights.values()), checkpoint
    assert not list(output_dir.glob(".tmp-*"))


def test_non_finite_weights_are_never_saved(tmp_path):
    from .conftest import tiny_model

    model = tiny_model()
    training._check_finite_weights(model, "a checkpoint")  # finite: no error
    parameters = dict(model.named_parameters())
    head = next(name for name in parameters if name.endswith("decode_head.q_proj.weight"))
    prompts = next(name for name in parameters if name.endswith("vision_model.prompt_embeddings"))
    with torch.no_grad():
        parameters[head].view(-1)[0] = float("nan")
        parameters[prompts].view(-1)[0] = float("inf")
    with pytest.raises(TrainingDivergedError, match="Not saving a checkpoint: 2 tensors") as raised:
        training._check_finite_weights(model, "a checkpoint")
    assert head in str(raised.value) and prompts in str(raised.value)


# ---- resuming -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interrupted_run(tiny_clip_dir, dataset_dir, tmp_path_factory):
    """A run stopped after its checkpoint-1 (as if killed during iteration 2)."""
    output_dir = tmp_path_factory.mktemp("interrupted") / "run"
    training.train(
        quick_args(tiny_clip_dir, dataset_dir, output_dir, "--max_steps", "1", "--checkpointing_steps", "1")
    )
    reset_accelerate()
    for name in ("config.json", "model.safetensors"):
        (output_dir / name).unlink()  # the final save of max_steps=1: not there after a crash
    return output_dir


def copy_of(run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, tmp_path / "run"))


def resume_args(clip_dir, data_dir, output_dir, *extra):
    return quick_args(clip_dir, data_dir, output_dir, "--checkpointing_steps", "1", "--resume_from_checkpoint",
                      "latest", *extra)  # fmt: skip


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_resuming_without_a_readable_random_state_is_an_error_unless_allowed(
    tiny_clip_dir, dataset_dir, interrupted_run, tmp_path, damage
):
    output_dir = copy_of(interrupted_run, tmp_path)
    random_state = output_dir / "checkpoint-1" / "random_states_0.pkl"
    if damage == "missing":
        random_state.unlink()
        expected = f"{random_state} is missing"
    else:
        random_state.write_bytes(random_state.read_bytes()[:100])  # truncated
        expected = f"{random_state} is unreadable"
    message = f"Cannot resume exactly from .*checkpoint-1: {re.escape(expected)}.*--allow_inexact_resume"
    with pytest.raises(ValueError, match=message):
        training.train(resume_args(tiny_clip_dir, dataset_dir, output_dir))
    reset_accelerate()
    assert not (output_dir / "checkpoint-2").exists()
    result = training.train(resume_args(tiny_clip_dir, dataset_dir, output_dir, "--allow_inexact_resume"))
    assert result["global_step"] == 2 and (output_dir / "checkpoint-2").is_dir()


def test_resuming_with_a_changed_recipe_names_the_change(tiny_clip_dir, dataset_dir, interrupted_run, tmp_path):
    output_dir = copy_of(interrupted_run, tmp_path)
    with pytest.raises(ValueError, match="the recipe differs from the checkpoint's: train.seed: 42 -> 7"):
        training.train(resume_args(tiny_clip_dir, dataset_dir, output_dir, "--seed", "7"))
    reset_accelerate()
    with pytest.raises(ValueError, match="resolved.per_device_train_batch_size: 2 -> 1"):
        training.train(quick_args(tiny_clip_dir, dataset_dir, output_dir, "--checkpointing_steps", "1",
                                  "--resume_from_checkpoint", "latest", batch_size=1))  # fmt: skip
    reset_accelerate()
    with pytest.raises(ValueError, match=r"train.learning_rate: 2e-05 -> 0.001.*train.weight_decay: 0.01 -> 0.0"):
        training.train(resume_args(tiny_clip_dir, dataset_dir, output_dir, "--learning_rate", "1e-3",
                                   "--weight_decay", "0"))  # fmt: skip
    reset_accelerate()
    # Logging, evaluation and checkpoint intervals, the worker count and the length of the run may change.
    result = training.train(
        resume_args(
            tiny_clip_dir,
            dataset_dir,
            output_dir,
            "--max_steps",
            "3",
            "--logging_steps",
            "2",
            "--dataloader_num_workers",
            "0",
            "--checkpoints_total_limit",
            "1",
        )
    )
    assert result["global_step"] == 3 and [path.name for path in list_checkpoints(output_dir)] == ["checkpoint-3"]


# ---- the starting model ---------------------------------------------------------------------------------------------


def test_a_broken_starting_model_folder_is_named(dataset_dir, tmp_path):
    from .conftest import tiny_model

    folder = tmp_path / "start"
    tiny_model().save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    args = ["--model_name_or_path", str(folder), "--dataset", str(dataset_dir), "--output_dir", str(tmp_path / "out"),
            "--max_steps", "1", "--per_device_train_batch_size", "1"]  # fmt: skip
    with pytest.raises(ValueError, match=f"Weight file {re.escape(str(weights))} is truncated or corrupt"):
        training.train(args)
    reset_accelerate()
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(folder))} holds no config.json"):
        training.train(args)
