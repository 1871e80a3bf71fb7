"""Tests of the Accelerate training loop (`clip_rc.commands.train`, `train_accelerate.py`) on a tiny CLIP and synthetic data.

Every run uses a tiny CLIP saved by the test (2-layer towers, patch 8), 64-pixel crops and a handful of steps.
In-process runs use one torch thread: on the shared 2-core machine, multi-threaded kernels on tiny tensors are ~100x
slower under load.
"""

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import clip_rc
from clip_rc import PRESETS, CLIPRCConfig, CLIPRCImageProcessor
from clip_rc.commands import train as training
from clip_rc.commands.train import (
    InfiniteShardedBatchSampler,
    ModelArguments,
    PolyWarmupLR,
    TrainingArguments,
    _resolve_plan,
    find_latest_checkpoint,
    list_checkpoints,
    parse_args,
    reference_multipliers,
    reference_parameter_groups,
)

from .colour_block_data import make_segmentation_dataset
from .conftest import tiny_config, tiny_model
from .random_clip import save_random_clip


REPO_ROOT = Path(__file__).resolve().parents[1]
# Decoder and prompts small enough for CPU; no attention dropout (PyTorch's CPU SDPA with dropout is very slow),
# the other dropouts stay on so that exact resumption has RNG state to restore.
TINY_OVERRIDES = (
    "decoder_hidden_size=24,decoder_intermediate_size=48,decoder_num_attention_heads=4,num_prompt_tokens=3,"
    "region_grid_size=2,decoder_attention_dropout=0.0"
)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return save_random_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    # Two seen VOC classes and one unseen (15, pottedplant): inductive runs ignore its pixels, transductive runs
    # pseudo-label them.
    return make_segmentation_dataset(
        tmp_path_factory.mktemp("synthetic"), num_train=6, num_validation=2, size=(64, 64), class_ids=[0, 1, 15]
    )


@pytest.fixture(autouse=True)
def _single_thread_and_fresh_accelerate_state():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run_args(clip_dir, data_dir, output_dir, *extra, preset="voc-inductive", batch_size=2) -> list[str]:
    return [
        "--preset", preset,
        "--clip_model_name_or_path", str(clip_dir),
        "--dataset", str(data_dir),
        "--output_dir", str(output_dir),
        "--crop_size", "64",
        "--config_overrides", TINY_OVERRIDES,
        "--per_device_train_batch_size", str(batch_size),
        "--logging_steps", "1",
        "--eval_steps", "0",
        "--checkpointing_steps", "0",
        *extra,
    ]  # fmt: skip


def expected_lr(
    iteration: int,
    base: float,
    total: int,
    warmup: int,
    ratio: float = 1e-6,
    power: float = 0.9,
    minimum: float = 1e-6,
) -> float:
    """mmcv's poly schedule with linear warm-up, written out independently of clip_rc.commands.train."""
    regular = (base - minimum) * (1 - iteration / total) ** power + minimum
    if iteration < warmup:
        return regular * (1 - (1 - iteration / warmup) * (1 - ratio))
    return regular


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
# Arguments and recipes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset, steps, total_batch",
    [
        ("voc-inductive", 40_000, 16),
        ("voc-transductive", 20_000, 16),
        ("voc-fully", 40_000, 16),
        ("coco-stuff-inductive", 80_000, 4),
        ("coco-stuff-transductive", 40_000, 4),
        ("coco-stuff-fully", 80_000, 4),
    ],
)
def test_presets_set_the_reference_schedule(preset, steps, total_batch):
    config = CLIPRCConfig.from_preset(preset)
    training_args = TrainingArguments(output_dir="unused")
    for num_processes in (1, 2):
        plan = _resolve_plan(ModelArguments(preset=preset), training_args, config, num_processes)
        assert plan.max_steps == steps and plan.lr_decay_steps == steps and plan.warmup_steps == 1500
        assert plan.eval_steps == plan.checkpointing_steps == steps // 10
        assert plan.per_device_train_batch_size * num_processes == total_batch
    # A loaded model without --preset: the recipe follows its benchmark and setting.
    plan = _resolve_plan(ModelArguments(), training_args, config, 2)
    assert plan.preset == preset and plan.max_steps == steps
    # A shorter run stops the reference schedule early unless told to fit it.
    plan = _resolve_plan(ModelArguments(preset=preset), TrainingArguments(output_dir="x", max_steps=100), config, 1)
    assert (plan.max_steps, plan.lr_decay_steps, plan.warmup_steps) == (100, steps, 1500)
    fitted = TrainingArguments(output_dir="x", max_steps=steps // 10, scale_lr_schedule=True)
    plan = _resolve_plan(ModelArguments(preset=preset), fitted, config, 1)
    assert (plan.lr_decay_steps, plan.warmup_steps) == (steps // 10, 150)


def test_loss_weights_and_setting_come_from_the_preset():
    weights = {name: CLIPRCConfig.from_preset(name) for name in PRESETS}
    assert [
        weights["voc-inductive"].mask_loss_weight,
        weights["voc-inductive"].dice_loss_weight,
        weights["voc-inductive"].recovery_loss_weight,
    ] == [100, 1, 2]
    assert weights["voc-fully"].recovery_loss_weight == 0
    assert [
        weights["coco-stuff-inductive"].mask_loss_weight,
        weights["coco-stuff-inductive"].dice_loss_weight,
        weights["coco-stuff-inductive"].recovery_loss_weight,
    ] == [200, 3, 50]
    assert weights["coco-stuff-inductive"].num_prompt_tokens == 100
    assert weights["voc-transductive"].setting == "transductive"


def test_arguments_from_json_and_yaml_files(tmp_path):
    cli = [
        "--preset",
        "voc-fully",
        "--clip_model_name_or_path",
        "clip",
        "--dataset",
        "data",
        "--output_dir",
        "out",
        "--max_steps",
        "7",
        "--train_scale",
        "256",
        "64",
        "--no_photometric_distortion",
        "--report_to",
        "tensorboard",
    ]
    from_cli = parse_args(cli)
    values = {
        "preset": "voc-fully",
        "clip_model_name_or_path": "clip",
        "dataset": "data",
        "output_dir": "out",
        "max_steps": 7,
        "train_scale": [256, 64],
        "photometric_distortion": False,
        "report_to": "tensorboard",
    }
    (tmp_path / "args.json").write_text(json.dumps(values))
    import yaml

    (tmp_path / "args.yaml").write_text(yaml.safe_dump(values))
    assert parse_args([str(tmp_path / "args.json")]) == from_cli
    assert parse_args([str(tmp_path / "args.yaml")]) == from_cli
    # The shipped example files parse.
    for path in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        model_args, _, _ = parse_args([str(path)])
        assert model_args.preset == path.stem


# ---------------------------------------------------------------------------------------------------------------
# Optimiser, schedule, gradients
# ---------------------------------------------------------------------------------------------------------------


def test_reference_multipliers_first_matching_key_wins():
    # Longest key first: norms inside the backbone and the head match `backbone` / `head` before `norm` / `ln`.
    assert reference_multipliers("clip_rc.vision_model.prompt_norm.weight") == (10.0, 1.0)
    assert reference_multipliers("clip_rc.vision_model.prompt_embeddings") == (10.0, 1.0)
    assert reference_multipliers("decode_head.decoder_q.0.norm2.weight") == (10.0, 1.0)
    assert reference_multipliers("clip_rc.text_model.final_layer_norm.weight") == (0.0, 1.0)
    assert reference_multipliers("neck.norm.weight") == (1.0, 0.0)
    assert reference_multipliers("neck.ln_1.bias") == (1.0, 0.0)


def test_parameter_groups_and_learning_rates_follow_spec():
    torch.manual_seed(0)
    model = tiny_model()
    groups = reference_parameter_groups(model, learning_rate=2e-5, weight_decay=0.01)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    grouped = [name for group in groups for name in group["param_names"]]
    assert sorted(grouped) == sorted(trainable) and len(grouped) == len(set(grouped))
    assert {group["name"] for group in groups} == {"backbone", "head"}
    for group in groups:
        assert group["lr"] == pytest.approx(2e-4) and group["weight_decay"] == pytest.approx(0.01)
    backbone = next(group for group in groups if group["name"] == "backbone")
    assert {
        "clip_rc.vision_model.prompt_norm.weight",
        "clip_rc.vision_model.prompt_proj.weight",
        "clip_rc.vision_model.prompt_embeddings",
        "clip_rc.vision_model.deep_prompt_embeddings",
    } <= set(backbone["param_names"])
    assert not any(name.startswith(("clip_rc.text_model", "clip_rc.visual_projection")) for name in grouped)

    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "param_names"} for g in groups], lr=2e-5)
    scheduler = PolyWarmupLR(
        optimizer, total_steps=40_000, warmup_steps=1500, warmup_ratio=1e-6, power=0.9, min_lr=1e-6
    )
    checkpoints = {0, 1, 750, 1499, 1500, 1501, 20_000, 39_999, 40_000}
    seen = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
        for iteration in range(40_001):
            if iteration in checkpoints:
                for group in optimizer.param_groups:
                    assert group["lr"] == pytest.approx(
                        expected_lr(iteration, 2e-4, 40_000, 1500), rel=1e-9, abs=1e-15
                    )
                seen.add(iteration)
            scheduler.step()
    assert seen == checkpoints
    assert expected_lr(0, 2e-4, 40_000, 1500) == pytest.approx(2e-10)
    assert expected_lr(40_000, 2e-4, 40_000, 1500) == pytest.approx(1e-6)


@pytest.mark.parametrize("setting", ["inductive", "transductive", "fully"])
def test_every_trainable_parameter_gets_a_gradient(setting):
    """Why DDP runs without find_unused_parameters: no trainable parameter is left out of the graph."""
    torch.manual_seed(0)
    model = tiny_model(tiny_config(setting=setting, recovery_loss_weight=0.0 if setting == "fully" else 2.0))
    model.train()
    labels = torch.randint(0, 3, (2, 64, 64))
    labels[:, :4] = 255
    model(torch.randn(2, 3, 64, 64), labels=labels).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_infinite_sampler_shards_epochs_and_resumes():
    world, batch, size, seed = 2, 2, 5, 3
    samplers = [InfiniteShardedBatchSampler(size, batch, world, rank, seed=seed) for rank in range(world)]
    iterators = [iter(sampler) for sampler in samplers]
    global_stream = []
    for _ in range(6):
        for iterator in iterators:
            global_stream += next(iterator)
    expected = []
    for epoch in range(6):
        order = torch.randperm(size, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        expected += [(index, epoch, position) for position, index in enumerate(order)]
    assert global_stream == expected[: len(global_stream)]
    # Resuming after 3 global batches continues the same stream.
    resumed = iter(InfiniteShardedBatchSampler(size, batch, world, 1, seed=seed, start_sample=3 * world * batch))
    assert next(resumed) == expected[3 * world * batch + batch : 3 * world * batch + 2 * batch]


# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_launch_trains_saves_and_logs(tiny_clip_dir, dataset_dir, tmp_path):
    output_dir = tmp_path / "ddp"
    # `accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.x unless mpirun is installed;
    # `--multi_gpu` starts two through torch.distributed.run, and the script runs them as a gloo (MULTI_CPU) group
    # when no accelerator is available.
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(REPO_ROOT / "train_accelerate.py"),
        *run_args(tiny_clip_dir, dataset_dir, output_dir, "--max_steps", "4", "--checkpointing_steps", "2",
                  "--eval_steps", "2", "--report_to", "tensorboard", batch_size=1),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ACCELERATE_USE_CPU", None)
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stderr[-5000:]

    recipe = json.loads((output_dir / "training_args.json").read_text())
    assert recipe["resolved.num_processes"] == 2 and recipe["resolved.total_train_batch_size"] == 2
    assert [path.name for path in list_checkpoints(output_dir)] == ["checkpoint-2", "checkpoint-4"]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in (output_dir / "checkpoint-4").iterdir()}

    from transformers import AutoModelForSemanticSegmentation

    model = AutoModelForSemanticSegmentation.from_pretrained(output_dir)
    assert isinstance(model, clip_rc.CLIPRCForSemanticSegmentation) and model.config.setting == "inductive"
    # The final model is the state of the last checkpoint.
    final, last = load_weights(output_dir), load_weights(output_dir / "checkpoint-4")
    assert all(torch.equal(final[name], last[name]) for name in final)
    assert (output_dir / "eval_results.json").is_file() and (output_dir / "processor_config.json").is_file()
    card = (output_dir / "README.md").read_text()
    assert "voc-inductive" in card and "hIoU" in card

    events = list((output_dir / "runs").rglob("events.out.tfevents*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {
        "train/loss",
        "train/loss_focal",
        "train/loss_dice",
        "train/lr_backbone",
        "train/lr_head",
        "eval/mean_iou",
    } <= tags


def test_resume_after_a_crash_matches_an_uninterrupted_run(tiny_clip_dir, dataset_dir, tmp_path, monkeypatch):
    common = (
        "--max_steps 5 --gradient_accumulation_steps 2 --learning_rate 1e-4 --warmup_steps 0 --no_final_evaluation"
    )
    # Uninterrupted, checkpointing every step, keeping the last two.
    uninterrupted = f"{common} --checkpointing_steps 1 --checkpoints_total_limit 2".split()
    reference = training.train(run_args(tiny_clip_dir, dataset_dir, tmp_path / "a", *uninterrupted, batch_size=1))
    assert [path.name for path in list_checkpoints(tmp_path / "a")] == ["checkpoint-4", "checkpoint-5"]

    # The same run crashing inside iteration 3 (after checkpoint-2), while loading its first micro-batch.
    interrupted = run_args(
        tiny_clip_dir, dataset_dir, tmp_path / "b", *common.split(), "--checkpointing_steps", "2", batch_size=1
    )
    original_getitem = training.AugmentedTrainSamples.__getitem__
    calls = {"count": 0}

    def crashing_getitem(self, key):
        calls["count"] += 1
        if calls["count"] == 5:
            raise RuntimeError("simulated crash")
        return original_getitem(self, key)

    monkeypatch.setattr(training.AugmentedTrainSamples, "__getitem__", crashing_getitem)
    with pytest.raises(RuntimeError, match="simulated crash"):
        training.train(interrupted)
    monkeypatch.setattr(training.AugmentedTrainSamples, "__getitem__", original_getitem)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()

    # Leftovers of a crash during a later save: a temporary folder and an incomplete checkpoint folder, both marked as
    # written by the training module (as every folder it writes).
    for leftover in (".tmp-checkpoint-4", "checkpoint-4"):
        (tmp_path / "b" / leftover).mkdir()
        (tmp_path / "b" / leftover / "model.safetensors").write_bytes(b"partial")
        (tmp_path / "b" / leftover / training.OWNER_MARKER).write_text("")
    assert find_latest_checkpoint(tmp_path / "b") == tmp_path / "b" / "checkpoint-2"
    state = json.loads((tmp_path / "b" / "checkpoint-2" / "training_state.json").read_text())
    position = (state["global_step"], state["consumed_samples"], state["epoch"], state["position_in_epoch"])
    assert position == (2, 4, 0, 4)

    resumed = training.train(interrupted + ["--resume_from_checkpoint", "latest"])
    assert resumed["global_step"] == 5
    expected, actual = load_weights(tmp_path / "a"), load_weights(tmp_path / "b")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)

    def losses(result):
        return [(entry["step"], entry["train/loss"]) for entry in result["log_history"] if "train/loss" in entry]

    assert losses(resumed) == losses(reference) and len(losses(reference)) == 5
    assert not list((tmp_path / "b").glob(".tmp-*"))
    assert (tmp_path / "b" / "checkpoint-4" / "training_state.json").is_file()


def test_loss_falls_and_logged_learning_rates_follow_the_schedule(tiny_clip_dir, dataset_dir, tmp_path, monkeypatch):
    """(With the image tower's activations recomputed in the backward pass: `--gradient_checkpointing`.)"""
    steps, warmup = 30, 3
    encode_class_prompts = clip_rc.CLIPRCModel.encode_class_prompts
    text_encodings = []

    def counting_encode_class_prompts(self, *args, **kwargs):
        text_encodings.append(args[0].shape if args else kwargs["input_ids"].shape)
        return encode_class_prompts(self, *args, **kwargs)

    monkeypatch.setattr(clip_rc.CLIPRCModel, "encode_class_prompts", counting_encode_class_prompts)
    evaluate_model = training.evaluate_model
    image_processors = []

    def recording_evaluate_model(*args, image_processor=None, **kwargs):
        image_processors.append(image_processor)
        return evaluate_model(*args, image_processor=image_processor, **kwargs)

    monkeypatch.setattr(training, "evaluate_model", recording_evaluate_model)
    result = training.train(
        run_args(
            tiny_clip_dir,
            dataset_dir,
            tmp_path / "run",
            "--max_steps",
            str(steps),
            "--learning_rate",
            "1e-4",
            "--warmup_steps",
            str(warmup),
            "--lr_decay_steps",
            str(steps),
            "--seed",
            "1",
            "--gradient_checkpointing",
            "True",
            batch_size=3,
        )
    )
    train_logs = [entry for entry in result["log_history"] if "train/loss" in entry]
    assert [entry["step"] for entry in train_logs] == list(range(1, steps + 1))
    for entry in train_logs:  # the lr used by update s is mmcv's lr at iteration s - 1
        for group in ("backbone", "head"):
            assert entry[f"train/lr_{group}"] == pytest.approx(expected_lr(entry["step"] - 1, 1e-3, steps, warmup))
    losses = [entry["train/loss"] for entry in train_logs]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, losses
    assert result["metrics"] is not None and 0.0 <= result["metrics"]["overall_accuracy"] <= 1.0
    # The final evaluation ran through the image processor of the model's crop (short side, windows, stride).
    assert len(image_processors) == 1 and isinstance(image_processors[0], CLIPRCImageProcessor)
    settings = image_processors[0].to_dict()
    assert settings["size"] == {"shortest_edge": 64} and settings["crop_size"] == {"height": 64, "width": 64}
    assert settings["sliding_window_stride"] == CLIPRCConfig.from_pretrained(tmp_path / "run").sliding_window_stride
    # The class embeddings were encoded once, by from_clip (20 VOC classes x 1 template), never per step.
    assert len(text_encodings) == 1 and tuple(text_encodings[0][:2]) == (20, 1)


class FakeHfApi:
    """`huggingface_hub.HfApi` without the Hub: records `create_repo` and `upload_folder` calls in `calls`."""

    calls: list = []

    def create_repo(self, repo_id, exist_ok=False, private=False, **kwargs):
        self.calls.append(("create_repo", repo_id, exist_ok, private))

        class RepoUrl(str):
            pass

        url = RepoUrl(f"https://huggingface.co/{repo_id}")
        url.repo_id = repo_id
        return url

    def upload_folder(self, repo_id, folder_path, ignore_patterns=None, **kwargs):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        self.calls.append(("upload_folder", repo_id, folder_path, files, ignore_patterns))


def test_transductive_stage_starts_from_an_inductive_checkpoint_and_pushes(
    tiny_clip_dir, dataset_dir, tmp_path, monkeypatch
):
    inductive_dir = tmp_path / "inductive"
    inductive_args = (
        "--max_steps 2 --checkpointing_steps 2 --learning_rate 1e-4 --warmup_steps 0 --no_final_evaluation"
    )
    training.train(run_args(tiny_clip_dir, dataset_dir, inductive_dir, *inductive_args.split()))
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()

    calls = []
    FakeHfApi.calls = calls
    monkeypatch.setattr(training, "HfApi", FakeHfApi)

    def no_text_encoding(*args, **kwargs):
        raise AssertionError("the training loop must use the persisted class embeddings, not re-encode text")

    monkeypatch.setattr(clip_rc.CLIPRCModel, "encode_class_prompts", no_text_encoding)
    start = inductive_dir / "checkpoint-2"
    output_dir = tmp_path / "transductive"
    result = training.train([
        "--preset", "voc-transductive", "--model_name_or_path", str(start), "--dataset", str(dataset_dir),
        "--output_dir", str(output_dir), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--logging_steps", "1", "--eval_steps", "0", "--checkpointing_steps", "0",
        "--push_to_hub", "--hub_model_id", "someone/clip-rc-voc-transductive",
    ])  # fmt: skip
    assert result["recipe"]["resolved.lr_decay_steps"] == 20_000  # the transductive recipe's schedule, restarted

    from transformers import AutoModelForSemanticSegmentation

    model = AutoModelForSemanticSegmentation.from_pretrained(output_dir)
    config = model.config
    assert config.setting == "transductive" and config.seen_score_bias == 0.0
    assert (config.mask_loss_weight, config.dice_loss_weight, config.recovery_loss_weight) == (100.0, 1.0, 2.0)
    assert config.crop_size == 64 and config.num_prompt_tokens == 3  # the checkpoint's architecture
    # Two warm-up updates (lr <= 1.4e-7) barely move the weights: the stage started from the inductive checkpoint.
    inductive, transductive = load_weights(start), load_weights(output_dir)
    for name in ("clip_rc.vision_model.prompt_embeddings", "decode_head.q_proj.weight", "class_embeddings"):
        assert torch.allclose(inductive[name], transductive[name], atol=1e-5), name

    assert calls[0] == ("create_repo", "someone/clip-rc-voc-transductive", True, False)
    _, repo_id, folder, files, ignore = calls[1]
    assert repo_id == "someone/clip-rc-voc-transductive" and Path(folder) == output_dir
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert any(pattern.startswith("checkpoint-") for pattern in ignore)
    assert result["repo_id"] == "someone/clip-rc-voc-transductive"
    card = (output_dir / "README.md").read_text()
    assert "transductive" in card and "someone/clip-rc-voc-transductive" in card
