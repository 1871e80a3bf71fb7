# Copyright 2024 The CLIP-RC authors and the clip-rc contributors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""`clip-rc-demo`: the whole zero-shot chain on a small world the library makes itself, offline, in minutes.

1. **Data** ([`clip_rc.toy.synthetic`]): a seeded synthetic benchmark of 12 classes (shape x colour x texture), 3 of
   them unseen (melon, donut, tile), written as a `save_to_disk` dataset (`data/`).
2. **CLIP** ([`clip_rc.toy.tiny_clip`]): a tiny `CLIPModel` and its BPE tokenizer trained on image-caption pairs
   naming all 12 classes (no masks), saved in the Hub's format (`clip/`); and a control CLIP with the same
   architecture and tokenizer that never saw a caption (`clip-control/`).
3. **CLIP-RC** ([`clip_rc.commands.train`], run as `python -m clip_rc.commands.train`, i.e. what
   `train_accelerate.py` runs): inductive training from each CLIP on the seen classes' masks only (unseen pixels
   ignored, unseen names never in the head), identical recipe and seed, the two runs at once in two processes of one
   torch thread each (`caption-clip/model`, `control/model`). Their output goes to `*/train.log`, and their progress
   (step, loss, ETA) to the console as they train. The recipe is the reference's (AdamW with its parameter groups,
   poly schedule with warm-up, random rescale and crop, flips, seen-score calibration 0.1, the focal / dice /
   recovery weights 200 / 3 / 50 of its COCO-Stuff zero-shot recipe) scaled to the tiny world: crop 96 with 8-pixel
   patches and a 4x4 region grid, a 64-wide decoder, 400 iterations of 8 crops at 4e-3, gradient clipping at 1.0, no
   dropout (drawing dropout masks is a quarter of a CPU step) and no photometric distortion (hue is a class attribute
   here: the reference's +-36 degree hue jitter would turn one class's colour into another's).
4. **Evaluation** ([`clip_rc.commands.evaluate`], as `eval.py`): all 12 classes on the held-out validation split
   (`*/eval/metrics.json`).
5. **Figure** ([`clip_rc.toy.demo_figure`]): a few validation images segmented by both models with
   [`clip_rc.commands.predict`] (as `clip-rc-predict`, `predictions/`), drawn beside their ground truth over the
   per-class IoU of both runs (`comparison.png`).

The seen / unseen / hIoU table of both runs is printed and written to `results.md`, and with the per-class IoU,
the probes of both CLIPs and the stage timings to `results.json`. Every stage says on the console what it is doing,
and `demo.log` keeps all of it. `clip-rc-demo --output_dir outputs/demo` takes about 3.5 minutes on 2 idle CPU cores
(data 2 s, tiny CLIP 70 s, both CLIP-RC runs 140 s, evaluation 3 s, figure 1 s), `--quick` 1.5 minutes (smaller
everything, weak numbers: used by the test suite). `python -m clip_rc.toy.demo_sweep` runs it over seeds and tabulates
them.
"""

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
import PIL.Image
import torch
import transformers

from ..utils import setup_logging, write_json_atomic, write_text_atomic
from .demo_figure import comparison_figure, pick_rows
from .synthetic import WorldConfig, synthetic_benchmark, write_synthetic_dataset
from .tiny_clip import PROBE_SEED, TinyCLIPArguments, patch_probe, save_untrained_clip, train_tiny_clip


logger = logging.getLogger("clip_rc.toy.demo")

__all__ = [
    "DemoRecipe",
    "DemoRun",
    "TrainingProgress",
    "build_clip_rc_start",
    "format_demo_table",
    "main",
    "parse_demo_table",
]


class DemoRun(NamedTuple):
    """One CLIP-RC run of the demo: its folder, the folder of the CLIP it starts from, its row in the table and its
    label in the figure."""

    name: str
    clip_folder: str
    description: str
    label: str


RUNS = (
    DemoRun("caption-clip", "clip", "CLIP trained on captions", "caption-trained CLIP"),
    DemoRun("control", "clip-control", "control: CLIP never trained", "untrained control CLIP"),
)
BENCHMARK = synthetic_benchmark()
CLASS_NAMES = BENCHMARK.class_names
UNSEEN_CLASS_IDS = BENCHMARK.unseen_class_ids


@dataclass
class DemoRecipe:
    """Sizes and hyper-parameters of the demo; [`DemoRecipe.quick`] is the `--quick` variant."""

    num_train: int = 1500
    num_validation: int = 200
    # The tiny CLIP trains alone: two torch threads (1.2x faster than one on 2 cores, rendering included).
    clip: TinyCLIPArguments = field(default_factory=lambda: TinyCLIPArguments(num_threads=2))
    # CLIP-RC (image side: crop 96 = the tiny CLIP's resolution, patch 8, 4x4 region grid of 3x3-patch cells;
    # windows two thirds of a crop apart, as the reference's 341 on 512)
    crop_size: int = 96
    sliding_window_stride: int = 64
    region_grid_size: int = 4
    num_prompt_tokens: int = 4
    decoder_hidden_size: int = 64
    decoder_num_attention_heads: int = 4
    decoder_intermediate_size: int = 256
    # No dropout: on CPU, drawing the dropout masks is a quarter of a training step, and the schedules are short.
    dropout: float = 0.0
    # 400, not 800: the longer schedule fit the 9 seen classes further (seen mIoU +1 to +2) at the unseen names' cost
    # (with the 700-step tiny CLIP, seed 6 tile 33 -> 51 IoU and seed 0 melon 54 -> 86 at 400 steps).
    max_steps: int = 400
    batch_size: int = 8
    learning_rate: float = 4e-4  # x10 multiplier of the reference's groups: 4e-3 on prompts and head
    warmup_steps: int = 30
    max_grad_norm: float = 1.0
    # Off: hue is a class attribute in this world, and the reference's hue jitter (+-36 degrees) would turn one
    # class's colour into another's.
    photometric_distortion: bool = False
    # The reference's COCO-Stuff zero-shot loss weights (focal / dice / recovery), not VOC's 100 / 1 / 2: with 9 seen
    # classes the small decoder overfits their 9 text embeddings, and the unseen names' scores, then barely above
    # zero on their own pixels, fall to the wrong unseen name (seed 2: 26 % of melon to donut). The recovery term,
    # which makes the decoder's outputs rebuild its text queries and CLIP's patch tokens, is CLIP-RC's guard
    # against that overfitting; 25x VOC's weight relative to the mask loss keeps the names' meaning.
    mask_loss_weight: float = 200.0
    dice_loss_weight: float = 3.0
    recovery_loss_weight: float = 50.0
    eval_batch_size: int = 8
    probe_images: int = 200
    progress_lines: int = 16  # training progress lines per CLIP-RC run
    num_figure_rows: int = 4

    @classmethod
    def quick(cls) -> "DemoRecipe":
        clip = TinyCLIPArguments.quick(steps=70, num_threads=2)
        return cls(num_train=400, num_validation=60, clip=clip, max_steps=100, warmup_steps=10, probe_images=100)


def build_clip_rc_start(clip_dir: str | os.PathLike, output_dir: str | os.PathLike, recipe: DemoRecipe) -> Path:
    """
    The CLIP-RC model training starts from, saved at `output_dir`: `from_clip` on the CLIP folder with the synthetic
    benchmark's classes, zero-shot split and template (class embeddings of all 12 classes computed once by the
    CLIP's text tower), the recipe's loss weights and the demo's small decoder.
    The CLIP's tokenizer is saved beside it.
    """
    from transformers import AutoTokenizer, CLIPConfig

    from ..configuration_clip_rc import CLIPRCConfig
    from ..image_processing_clip_rc import CLIPRCImageProcessor
    from ..modeling_clip_rc import CLIPRCForSemanticSegmentation
    from ..processing_clip_rc import CLIPRCProcessor

    benchmark = BENCHMARK
    clip_config = CLIPConfig.from_pretrained(clip_dir)
    config = CLIPRCConfig(
        vision_config=clip_config.vision_config.to_dict(),
        text_config=clip_config.text_config.to_dict(),
        projection_dim=clip_config.projection_dim,
        crop_size=recipe.crop_size,
        sliding_window_stride=recipe.sliding_window_stride,
        num_prompt_tokens=recipe.num_prompt_tokens,
        region_grid_size=recipe.region_grid_size,
        decoder_hidden_size=recipe.decoder_hidden_size,
        decoder_num_attention_heads=recipe.decoder_num_attention_heads,
        decoder_intermediate_size=recipe.decoder_intermediate_size,
        id2label=benchmark.id2label,
        seen_class_ids=list(benchmark.seen_class_ids),
        prompt_templates=list(benchmark.templates),
        prompt_dropout=recipe.dropout,
        decoder_dropout=recipe.dropout,
        decoder_attention_dropout=recipe.dropout,
        setting="inductive",
        mask_loss_weight=recipe.mask_loss_weight,
        dice_loss_weight=recipe.dice_loss_weight,
        recovery_loss_weight=recipe.recovery_loss_weight,
    )
    processor = CLIPRCProcessor(
        CLIPRCImageProcessor.from_model_config(config), AutoTokenizer.from_pretrained(clip_dir),
        templates=config.prompt_templates,
    )  # fmt: skip
    torch.manual_seed(recipe.clip.seed)
    model = CLIPRCForSemanticSegmentation.from_clip(str(clip_dir), config, processor=processor)
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def _training_argv(start_dir: Path, data_dir: Path, output_dir: Path, recipe: DemoRecipe, seed: int) -> list[str]:
    """Command line of `train_accelerate.py` (`clip_rc.commands.train`) for one demo run."""
    return [
        "--model_name_or_path", str(start_dir),
        "--dataset", str(data_dir),
        "--output_dir", str(output_dir),
        "--overwrite_output_dir",
        "--max_steps", str(recipe.max_steps),
        "--per_device_train_batch_size", str(recipe.batch_size),
        "--learning_rate", str(recipe.learning_rate),
        "--warmup_steps", str(recipe.warmup_steps),
        "--lr_decay_steps", str(recipe.max_steps),
        "--max_grad_norm", str(recipe.max_grad_norm),
        "--photometric_distortion", str(recipe.photometric_distortion),
        "--eval_steps", "0",
        "--checkpointing_steps", "0",
        "--final_evaluation", "False",
        "--logging_steps", str(max(1, recipe.max_steps // recipe.progress_lines)),
        "--seed", str(seed),
    ]  # fmt: skip


# A training log line with the step count and the total loss (`clip_rc.commands.train` logs one every --logging_steps).
TRAINING_STEP_LINE = re.compile(r"\bstep (\d+): loss=([^,\s]+)")
# Lines of a training log that the console shows as they are (the rest stays in the run's log file).
TRAINING_NOTABLE_LINE = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback|Training done|Saved the final model")


def _duration(seconds: float) -> str:
    """`75.2` -> `"1:15"` (minutes:seconds)."""
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}:{seconds:02d}"


class TrainingProgress:
    """
    Turns the output lines of one run's training process into progress lines on the demo's logger: a step line as
    `run: step n/N, loss, elapsed, ETA`, warnings, errors and the closing lines as they are (prefixed with the run's
    name), nothing for the other lines. The ETA extrapolates the pace since the first step line (before it, the
    process was starting up).
    """

    def __init__(self, run: str, total_steps: int):
        self.run, self.total_steps = run, total_steps
        self.first: tuple[int, float] | None = None  # (step, elapsed seconds) of the first step line

    def report(self, line: str, elapsed: float):
        step_match = TRAINING_STEP_LINE.search(line)
        if step_match:
            step = int(step_match[1])
            first_step, first_elapsed = self.first or (0, 0.0)
            seconds_per_step = (elapsed - first_elapsed) / (step - first_step) if step > first_step else elapsed / step
            self.first = self.first or (step, elapsed)
            logger.info(
                "%s: step %d/%d, loss %s, %s elapsed, ETA %s",
                self.run, step, self.total_steps, step_match[2], _duration(elapsed),
                _duration(seconds_per_step * max(self.total_steps - step, 0)),
            )  # fmt: skip
        elif TRAINING_NOTABLE_LINE.search(line):
            if re.search(r"Training done|Saved the final model", line):
                logger.info("%s: %s", self.run, line.split(": ", 1)[-1])
            else:
                logger.warning("%s: %s", self.run, line)


@dataclass
class TrainingProcess:
    """One CLIP-RC training run in a process of its own, its output relayed by a thread to its log and the console."""

    run: str
    process: subprocess.Popen
    log_path: Path
    relay: threading.Thread


def _relay(run: str, process: subprocess.Popen, log_path: Path, total_steps: int, started: float):
    progress = TrainingProgress(run, total_steps)
    with open(log_path, "w", encoding="utf-8") as log:
        for line in process.stdout:
            log.write(line)
            log.flush()
            progress.report(line.rstrip("\n"), time.perf_counter() - started)


def _launch_training(run: str, argv: list[str], log_path: Path, num_threads: int, total_steps: int) -> TrainingProcess:
    """Start `python -m clip_rc.commands.train argv` (what `train_accelerate.py` runs) in a process of its own, with
    `num_threads` torch threads; every line it writes goes to `log_path`, and its progress to the console."""
    env = dict(os.environ)
    if num_threads:
        env.update(OMP_NUM_THREADS=str(num_threads), MKL_NUM_THREADS=str(num_threads))
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    env.setdefault("TQDM_DISABLE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-m", "clip_rc.commands.train", *argv],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, encoding="utf-8", errors="replace",
    )  # fmt: skip
    relay = threading.Thread(
        target=_relay,
        args=(run, process, log_path, total_steps, time.perf_counter()),
        name=f"relay-{run}",
        daemon=True,
    )
    relay.start()
    return TrainingProcess(run, process, log_path, relay)


def _stop(trainings: list[TrainingProcess]):
    """Terminate the runs still going (the demo was interrupted or failed)."""
    for training in trainings:
        if training.process.poll() is None:
            training.process.terminate()
            training.process.wait()


def _wait(trainings: list[TrainingProcess]):
    """Wait for every run (stopping them if the wait itself is interrupted); raise with the end of each failed run's
    log."""
    failed = []
    try:
        for training in trainings:
            training.process.wait()
            training.relay.join()
            if training.process.returncode != 0:
                tail = training.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-20:]
                failed.append(
                    f"CLIP-RC training of run {training.run!r} failed (exit {training.process.returncode}); end of "
                    f"{training.log_path}:\n" + "\n".join(tail)
                )
    except BaseException:
        _stop(trainings)
        raise
    if failed:
        raise RuntimeError("\n\n".join(failed))


def _evaluate(model_dir: Path, data_dir: Path, output_dir: Path, batch_size: int) -> dict:
    from ..commands import evaluate

    argv = ["--model", str(model_dir), "--dataset", str(data_dir), "--split", "validation", "--output_dir",
            str(output_dir), "--batch_size", str(batch_size), "--no_progress"]  # fmt: skip
    if evaluate.main(argv) != 0:
        raise RuntimeError(f"Evaluating {model_dir} failed (see the log above).")
    return json.loads((output_dir / "metrics.json").read_text())


def _figures(metrics: dict) -> dict[str, float]:
    def percent(key):
        value = metrics.get(key)
        return float("nan") if value is None else 100.0 * float(value)

    return {
        "mIoU(S)": percent("mean_iou_seen"),
        "mIoU(U)": percent("mean_iou_unseen"),
        "hIoU": percent("harmonic_iou"),
        "mIoU": percent("mean_iou"),
        "pAcc": percent("overall_accuracy"),
    }


def format_demo_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per run (its description), columns mIoU(S), mIoU(U), hIoU, mIoU, pAcc (in %)."""
    columns = ["mIoU(S)", "mIoU(U)", "hIoU", "mIoU", "pAcc"]
    lines = ["| run | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, figures in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{figures[c]:.2f}" for c in columns) + " |")
    return "\n".join(lines)


def parse_demo_table(text: str) -> dict[str, dict[str, float]]:
    """Inverse of [`format_demo_table`] (ignores any other line)."""
    rows, columns = {}, None
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.strip().startswith("|") or len(cells) < 2:
            continue
        if cells[0] == "run":
            columns = cells[1:]
        elif columns and not set(cells[0]) <= set("-"):
            rows[cells[0]] = {column: float(value) for column, value in zip(columns, cells[1:])}
    return rows


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clip-rc-demo",
        description="Zero-shot segmentation end to end on a synthetic world: data, tiny CLIP, CLIP-RC, evaluation.",
    )
    parser.add_argument("--output_dir", default="outputs/clip-rc-demo", help="Where every artefact is written.")
    parser.add_argument("--quick", action="store_true", help="A ~1.5-minute run with smaller data and schedules.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the data, the CLIPs and CLIP-RC training.")
    parser.add_argument(
        "--num_threads", type=int, default=1,
        help="torch threads of each of the two CLIP-RC training processes and of the evaluation (1 by default: the two "
        "runs share 2 cores; 0 keeps torch's default). The tiny CLIP, trained alone, uses 2.",
    )  # fmt: skip
    return parser.parse_args(argv)


class _Stages:
    """Announces each stage of the demo on the log as it starts, and its duration when it ends."""

    def __init__(self, count: int):
        self.count, self.index, self.timings = count, 0, {}
        self.started = self.stage_started = time.perf_counter()
        self.name = None

    def start(self, name: str, message: str, *message_args):
        self.index += 1
        self.name, self.stage_started = name, time.perf_counter()
        logger.info(f"[{self.index}/{self.count}] {name}: {message}", *message_args)

    def done(self):
        now = time.perf_counter()
        self.timings[self.name] = round(now - self.stage_started, 1)
        logger.info(
            "[%d/%d] %s done in %.1f s (total %.1f s)",
            self.index, self.count, self.name, now - self.stage_started, now - self.started,
        )  # fmt: skip

    def total(self) -> float:
        self.timings["total"] = round(time.perf_counter() - self.started, 1)
        return self.timings["total"]


def _make_data(output_dir: Path, recipe: DemoRecipe, seed: int, stages: _Stages) -> Path:
    stages.start(
        "data", "generating %d training and %d validation scenes of the synthetic world (seed %d)",
        recipe.num_train, recipe.num_validation, seed,
    )  # fmt: skip
    data_dir = output_dir / "data"
    if data_dir.exists():
        shutil.rmtree(data_dir)
    write_synthetic_dataset(
        data_dir, recipe.num_train, recipe.num_validation, seed=seed, config=WorldConfig(image_size=recipe.crop_size)
    )
    stages.done()
    return data_dir


def _make_clips(output_dir: Path, recipe: DemoRecipe, seed: int, stages: _Stages) -> dict[str, dict]:
    """The caption-trained tiny CLIP and the untrained control, and the patch-token probe of both."""
    stages.start(
        "tiny CLIP", "training a tiny CLIP on %d image-caption batches of %d (no masks), and the untrained control",
        recipe.clip.steps, recipe.clip.batch_size,
    )  # fmt: skip
    _, tokenizer = train_tiny_clip(output_dir / "clip", recipe.clip, show_progress=False)
    save_untrained_clip(output_dir / "clip-control", recipe.clip, tokenizer=tokenizer)
    probes = {}
    for run in RUNS:
        probe = patch_probe(output_dir / run.clip_folder, num_images=recipe.probe_images, seed=PROBE_SEED + seed)
        probes[run.name] = probe
        logger.info(
            "patch-token probe of %s: seen pixel accuracy %.1f %%, unseen %.1f %% (chance %.1f %%)",
            run.clip_folder, probe["seen_pixel_accuracy"], probe["unseen_pixel_accuracy"], 100 / len(CLASS_NAMES),
        )  # fmt: skip
    stages.done()
    return probes


def _train_clip_rc(output_dir: Path, data_dir: Path, recipe: DemoRecipe, args: argparse.Namespace, stages: _Stages):
    """CLIP-RC from each CLIP: both runs at once, one process (and one core) each, identical recipe and seed."""
    stages.start(
        "CLIP-RC training", "%d iterations of %d crops from each CLIP, both runs at once (logs in */train.log)",
        recipe.max_steps, recipe.batch_size,
    )  # fmt: skip
    trainings = []
    try:
        for run in RUNS:
            run_dir = output_dir / run.name
            start_dir = build_clip_rc_start(output_dir / run.clip_folder, run_dir / "start", recipe)
            argv = _training_argv(start_dir, data_dir, run_dir / "model", recipe, args.seed)
            write_text_atomic(run_dir / "train_args.json", json.dumps(argv, indent=2) + "\n")
            log_path = run_dir / "train.log"
            trainings.append(_launch_training(run.name, argv, log_path, args.num_threads, recipe.max_steps))
    except BaseException:
        _stop(trainings)
        raise
    _wait(trainings)
    stages.done()


def _evaluate_runs(output_dir: Path, data_dir: Path, recipe: DemoRecipe, stages: _Stages) -> dict[str, dict]:
    stages.start("evaluation", "scoring both models on the validation split over all %d classes", len(CLASS_NAMES))
    metrics = {}
    for run in RUNS:
        run_dir = output_dir / run.name
        metrics[run.name] = _evaluate(run_dir / "model", data_dir, run_dir / "eval", recipe.eval_batch_size)
        figures = _figures(metrics[run.name])
        logger.info("%s: seen mIoU %.2f, unseen mIoU %.2f", run.name, figures["mIoU(S)"], figures["mIoU(U)"])
    stages.done()
    return metrics


def _predict_rows(output_dir: Path, data_dir: Path, num_rows: int) -> tuple[list, list, dict[str, list]]:
    """The figure's validation images (see `pick_rows`), their label maps, and both runs' label maps of them, from
    the prediction script (`clip-rc-predict`, its `*_labels.png` hold class ids)."""
    from ..commands import predict
    from ..data import load_segmentation_dataset

    validation = load_segmentation_dataset(data_dir, splits="validation")["validation"]
    truths = [np.asarray(label) for label in validation["label"]]
    rows = pick_rows(truths, UNSEEN_CLASS_IDS, num_rows)
    samples_dir = output_dir / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    images, paths = [], []
    for index in rows:
        image = validation[index]["image"]
        paths.append(samples_dir / f"validation-{index:03d}.png")
        image.save(paths[-1])
        images.append(np.asarray(image))
    predictions = {}
    for run in RUNS:
        prediction_dir = output_dir / "predictions" / run.name
        model_dir = output_dir / run.name / "model"
        argv = [*map(str, paths), "--model", str(model_dir), "--output_dir", str(prediction_dir), "--overwrite"]
        if predict.main(argv) != 0:
            raise RuntimeError(f"Segmenting the figure's images with {model_dir} failed (see the log above).")
        label_paths = [prediction_dir / f"{path.stem}_labels.png" for path in paths]
        predictions[run.name] = [np.asarray(PIL.Image.open(label_path)) for label_path in label_paths]
    return images, [truths[index] for index in rows], predictions


def _draw_figure(output_dir: Path, data_dir: Path, metrics: dict, recipe: DemoRecipe, stages: _Stages) -> Path:
    stages.start(
        "figure", "segmenting %d validation images with both models for comparison.png", recipe.num_figure_rows
    )
    images, truths, predictions = _predict_rows(output_dir, data_dir, recipe.num_figure_rows)
    path = comparison_figure(
        output_dir / "comparison.png",
        images,
        truths,
        {f"from the\n{run.label}": predictions[run.name] for run in RUNS},
        {run.label: metrics[run.name]["per_category_iou"] for run in RUNS},
        CLASS_NAMES,
        UNSEEN_CLASS_IDS,
    )
    logger.info("wrote %s", path)
    stages.done()
    return path


def _per_class_iou(metrics: dict) -> dict[str, float | None]:
    return {
        name: None if value is None else round(100 * float(value), 2)
        for name, value in zip(CLASS_NAMES, metrics["per_category_iou"])
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the demo (see the module docstring); returns the results (also written to `results.json`)."""
    args = _parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    setup_logging()
    # Every message of the demo and of the scripts it calls also goes to demo.log.
    log_file = logging.FileHandler(output_dir / "demo.log", mode="w", encoding="utf-8")
    log_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.getLogger().addHandler(log_file)
    try:
        return _run(args, output_dir)
    finally:
        logging.getLogger().removeHandler(log_file)
        log_file.close()


def _run(args: argparse.Namespace, output_dir: Path) -> dict:
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    # The loading / saving bars of transformers and datasets are instantaneous here, and would drown the stages.
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    recipe = DemoRecipe.quick() if args.quick else DemoRecipe()
    recipe.clip.seed = args.seed
    recipe.clip.image_size = recipe.crop_size
    stages = _Stages(count=5)

    data_dir = _make_data(output_dir, recipe, args.seed, stages)
    probes = _make_clips(output_dir, recipe, args.seed, stages)
    _train_clip_rc(output_dir, data_dir, recipe, args, stages)
    metrics = _evaluate_runs(output_dir, data_dir, recipe, stages)
    figure = _draw_figure(output_dir, data_dir, metrics, recipe, stages)
    stages.total()

    results = {
        "table": {run.description: _figures(metrics[run.name]) for run in RUNS},
        "per_class_iou": {run: _per_class_iou(metrics[run]) for run in metrics},
        "probe": probes,
        "figure": str(figure),
        "timings_seconds": stages.timings,
        "quick": args.quick,
        "seed": args.seed,
        "recipe": asdict(recipe),
        "benchmark": {"name": BENCHMARK.name, "unseen_class_names": list(BENCHMARK.unseen_class_names)},
    }
    _write_results(output_dir, results, recipe)
    return results


def _write_results(output_dir: Path, results: dict, recipe: DemoRecipe):
    """`results.json`, the table in `results.md`, and the table on the standard output (the program's output)."""
    table = format_demo_table(results["table"])
    write_json_atomic(output_dir / "results.json", results)
    write_text_atomic(output_dir / "results.md", table + "\n")
    logger.info("wrote %s, %s and %s", output_dir / "results.md", output_dir / "results.json", results["figure"])
    unseen = ", ".join(results["benchmark"]["unseen_class_names"])
    sys.stdout.write(
        f"\nZero-shot segmentation of the synthetic world (unseen: {unseen}), {recipe.num_validation} validation"
        f" images, {results['timings_seconds']['total']:.0f} s:\n{table}\n"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
