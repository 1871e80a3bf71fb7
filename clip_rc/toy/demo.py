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

1. **Data** ([`clip_rc.toy.synthetic`]): a seeded synthetic benchmark of 12 classes (shape x colour x texture), 3 of them
   unseen (melon, donut, tile), written as a `save_to_disk` dataset (`data/`).
2. **CLIP** ([`clip_rc.toy.tiny_clip`]): a tiny `CLIPModel` and its BPE tokenizer trained on image-caption pairs naming
   all 12 classes (no masks), saved in the Hub's format (`clip/`); and a control CLIP with the same architecture
   and tokenizer that never saw a caption (`clip-control/`).
3. **CLIP-RC** ([`clip_rc.commands.train`], run as `python -m clip_rc.commands.train`, i.e. what `train_accelerate.py` runs):
   inductive training from each CLIP on the seen classes' masks only (unseen pixels ignored, unseen names never in
   the head), identical recipe and seed, the two runs at once in two processes of one torch thread each
   (`caption-clip/model`, `control/model`, logs in `*/train.log`). The recipe is the reference's (AdamW with its
   parameter groups, poly schedule with warm-up, focal / dice / recovery weights 100 / 1 / 2, random rescale and
   crop, flips, seen-score calibration 0.1) scaled to the tiny world: crop 96 with 8-pixel patches and a 4x4 region
   grid, a 64-wide decoder, 800 iterations of 8 crops at 4e-3, gradient clipping at 1.0, no dropout (drawing dropout
   masks is a quarter of a CPU step) and no photometric distortion (hue is a class attribute here: the reference's
   +-36 degree hue jitter would turn one class's colour into another's).
4. **Evaluation** ([`clip_rc.commands.evaluate`], as `eval.py`): all 12 classes on the held-out validation split
   (`*/eval/metrics.json`), and overlays of a few validation images with [`clip_rc.commands.predict`] (as `clip-rc-predict`,
   `predictions/`).
5. The seen / unseen / hIoU table of both runs is printed and written to `results.md` / `results.json`.

`clip-rc-demo --output_dir outputs/demo` (8 minutes on 2 CPU cores: data 4 s, tiny CLIP 2.5 min, both CLIP-RC runs
5.5 min, evaluation and overlays 8 s) or `--quick` (1.5 minutes, smaller everything, weak numbers: used by the test
suite). The README shows the table of seed 0; seeds 1 and 2 gave (caption-trained CLIP / control) seen mIoU
82.4 / 66.9 and 82.6 / 74.7, unseen mIoU 78.1 / 20.3 and 54.1 / 27.0.
"""

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import PIL.Image
import torch

from .synthetic import WorldConfig, load_synthetic_benchmark, write_synthetic_dataset
from .tiny_clip import TinyCLIPArguments, patch_probe, save_untrained_clip, train_tiny_clip
from ..utils import setup_logging, write_json_atomic, write_text_atomic


logger = logging.getLogger("clip_rc.toy.demo")

__all__ = ["DemoRecipe", "build_clip_rc_start", "format_demo_table", "main", "parse_demo_table"]

RUNS = (("caption-clip", "clip", "CLIP trained on captions"), ("control", "clip-control", "control: CLIP never trained"))


@dataclass
class DemoRecipe:
    """Sizes and hyper-parameters of the demo; [`DemoRecipe.quick`] is the `--quick` variant."""

    num_train: int = 1500
    num_validation: int = 200
    # The tiny CLIP trains alone: two torch threads (1.2x faster than one on 2 cores, rendering included).
    clip: TinyCLIPArguments = field(default_factory=lambda: TinyCLIPArguments(num_threads=2))
    # CLIP-RC (image side: crop 96 = the tiny CLIP's resolution, patch 8, 4x4 region grid of 3x3-patch cells)
    crop_size: int = 96
    region_grid_size: int = 4
    num_prompt_tokens: int = 4
    decoder_hidden_size: int = 64
    decoder_num_attention_heads: int = 4
    decoder_intermediate_size: int = 256
    # No dropout: on CPU, drawing the dropout masks is a quarter of a training step, and the schedules are short.
    dropout: float = 0.0
    max_steps: int = 800
    batch_size: int = 8
    learning_rate: float = 4e-4  # x10 multiplier of the reference's groups: 4e-3 on prompts and head
    warmup_steps: int = 30
    max_grad_norm: float = 1.0
    # Off: hue is a class attribute in this world, and the reference's hue jitter (+-36 degrees) would turn one
    # class's colour into another's.
    photometric_distortion: bool = False
    num_overlays: int = 6

    @classmethod
    def quick(cls) -> "DemoRecipe":
        clip = TinyCLIPArguments.quick(steps=70, num_threads=2)
        return cls(num_train=400, num_validation=60, clip=clip, max_steps=100, warmup_steps=10)


def build_clip_rc_start(clip_dir: str | os.PathLike, output_dir: str | os.PathLike, recipe: DemoRecipe) -> Path:
    """
    The CLIP-RC model training starts from, saved at `output_dir`: `from_clip` on the CLIP folder with the synthetic
    benchmark's classes, zero-shot split and template (class embeddings of all 12 classes computed once by the
    CLIP's text tower), the reference's VOC inductive loss weights (100 / 1 / 2) and the demo's small decoder.
    The CLIP's tokenizer is saved beside it.
    """
    from transformers import AutoTokenizer, CLIPConfig

    from ..configuration_clip_rc import CLIPRCConfig
    from ..image_processing_clip_rc import CLIPRCImageProcessor
    from ..modeling_clip_rc import CLIPRCForSemanticSegmentation
    from ..processing_clip_rc import CLIPRCProcessor

    benchmark = load_synthetic_benchmark()
    clip_config = CLIPConfig.from_pretrained(clip_dir)
    config = CLIPRCConfig(
        vision_config=clip_config.vision_config.to_dict(),
        text_config=clip_config.text_config.to_dict(),
        projection_dim=clip_config.projection_dim,
        crop_size=recipe.crop_size,
        sliding_window_stride=max(1, recipe.crop_size * 2 // 3),
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
        mask_loss_weight=100.0,
        dice_loss_weight=1.0,
        recovery_loss_weight=2.0,
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
        "--logging_steps", str(max(1, recipe.max_steps // 5)),
        "--seed", str(seed),
    ]  # fmt: skip


def _launch_training(argv: list[str], log_path: Path, num_threads: int) -> subprocess.Popen:
    """Start `python -m clip_rc.commands.train argv` (what `train_accelerate.py` runs) in a process of its own, with
    `num_threads` torch threads, its output going to `log_path`."""
    env = dict(os.environ)
    if num_threads:
        env.update(OMP_NUM_THREADS=str(num_threads), MKL_NUM_THREADS=str(num_threads))
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    env.setdefault("TQDM_DISABLE", "1")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "clip_rc.commands.train", *argv], stdout=log, stderr=subprocess.STDOUT, env=env
        )


def _wait(processes: dict[str, tuple[subprocess.Popen, Path]]):
    failed = []
    for name, (process, log_path) in processes.items():
        if process.wait() != 0:
            tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-20:]
            failed.append(f"CLIP-RC training of run {name!r} failed (exit {process.returncode}); end of {log_path}:\n"
                          + "\n".join(tail))
    if failed:
        raise RuntimeError("\n\n".join(failed))


def _evaluate(model_dir: Path, data_dir: Path, output_dir: Path) -> dict:
    from ..commands import evaluate as evaluation

    argv = ["--model", str(model_dir), "--dataset", str(data_dir), "--split", "validation", "--output_dir",
            str(output_dir), "--batch_size", "8", "--no_progress"]  # fmt: skip
    if evaluation.main(argv) != 0:
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


def _save_sample_images(data_dir: Path, output_dir: Path, count: int) -> list[str]:
    from ..data import load_segmentation_dataset

    validation = load_segmentation_dataset(data_dir, splits="validation")["validation"]
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(min(count, len(validation))):
        path = output_dir / f"validation-{index:03d}.png"
        image = validation[index]["image"]
        # 3x larger (nearest): the model still sees the image at its crop size, the overlay and legend read better
        image.resize((3 * image.width, 3 * image.height), PIL.Image.NEAREST).save(path)
        paths.append(str(path))
    return paths


def main(argv: list[str] | None = None) -> dict:
    """Run the demo (see the module docstring); returns the results (also written to `results.json`)."""
    parser = argparse.ArgumentParser(
        prog="clip-rc-demo",
        description="Zero-shot segmentation end to end on a synthetic world: data, tiny CLIP, CLIP-RC, evaluation.",
    )
    parser.add_argument("--output_dir", default="outputs/clip-rc-demo", help="Where every artefact is written.")
    parser.add_argument("--quick", action="store_true", help="A ~2-minute run with smaller data and schedules.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the data, the CLIPs and CLIP-RC training.")
    parser.add_argument(
        "--num_threads", type=int, default=1,
        help="torch threads of each of the two CLIP-RC training processes and of the evaluation (1 by default: the two "
        "runs share 2 cores; 0 keeps torch's default). The tiny CLIP, trained alone, uses 2.",
    )  # fmt: skip
    args = parser.parse_args(argv)
    setup_logging()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)

    recipe = DemoRecipe.quick() if args.quick else DemoRecipe()
    recipe.clip.seed = args.seed
    recipe.clip.image_size = recipe.crop_size
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 1)
        logger.info("%s done in %.1f s (total %.1f s)", name, now - since, now - start)
        return now

    # 1. data
    mark = time.perf_counter()
    data_dir = output_dir / "data"
    if data_dir.exists():
        shutil.rmtree(data_dir)
    write_synthetic_dataset(
        data_dir, recipe.num_train, recipe.num_validation, seed=args.seed, config=WorldConfig(image_size=recipe.crop_size)
    )
    mark = lap("data", mark)

    # 2. CLIPs
    _, tokenizer = train_tiny_clip(output_dir / "clip", recipe.clip, show_progress=False)
    save_untrained_clip(output_dir / "clip-control", recipe.clip, tokenizer=tokenizer)
    mark = lap("tiny CLIP", mark)
    probes = {}
    for run, clip_folder, _ in RUNS:
        probe = patch_probe(output_dir / clip_folder, num_images=100 if args.quick else 200, seed=args.seed + 12345)
        probe.pop("confusion")
        probes[run] = probe
        logger.info(
            "patch-token probe of %s: seen pixel accuracy %.1f %%, unseen %.1f %% (chance 8.3 %%)",
            clip_folder, probe["seen_pixel_accuracy"], probe["unseen_pixel_accuracy"],
        )  # fmt: skip
    mark = lap("probe", mark)

    # 3. CLIP-RC from each CLIP: both runs at once, one process (and one core) each, identical recipe and seed
    processes = {}
    for run, clip_folder, _ in RUNS:
        run_dir = output_dir / run
        start_dir = build_clip_rc_start(output_dir / clip_folder, run_dir / "start", recipe)
        argv_run = _training_argv(start_dir, data_dir, run_dir / "model", recipe, args.seed)
        (run_dir / "train_args.json").write_text(json.dumps(argv_run, indent=2) + "\n")
        processes[run] = (_launch_training(argv_run, run_dir / "train.log", args.num_threads), run_dir / "train.log")
    logger.info("training CLIP-RC from both CLIPs in parallel (logs: %s)", ", ".join(str(p[1]) for p in processes.values()))
    _wait(processes)
    mark = lap("CLIP-RC training", mark)

    # 4. evaluation on the held-out validation split, all 12 classes
    rows, metrics = {}, {}
    for run, _, description in RUNS:
        metrics[run] = _evaluate(output_dir / run / "model", data_dir, output_dir / run / "eval")
        rows[description] = _figures(metrics[run])
    mark = lap("evaluation", mark)

    from ..commands import predict

    images = _save_sample_images(data_dir, output_dir / "samples", recipe.num_overlays)
    if predict.main(images + ["--model", str(output_dir / "caption-clip" / "model"), "--output_dir", str(output_dir / "predictions")]) != 0:
        raise RuntimeError("Writing the overlays failed (see the log above).")
    mark = lap("overlays", mark)

    table = format_demo_table(rows)
    timings["total"] = round(time.perf_counter() - start, 1)
    results = {
        "table": rows,
        "probe": probes,
        "timings_seconds": timings,
        "quick": args.quick,
        "seed": args.seed,
        "recipe": asdict(recipe),
        "benchmark": {"name": "synthetic-shapes", "unseen_class_names": list(load_synthetic_benchmark().unseen_class_names)},
    }
    write_json_atomic(output_dir / "results.json", results)
    write_text_atomic(output_dir / "results.md", table + "\n")
    sys.stdout.write(
        f"\nZero-shot segmentation of the synthetic world (unseen: {', '.join(results['benchmark']['unseen_class_names'])}),"
        f" {recipe.num_validation} validation images, {timings['total']:.0f} s:\n{table}\n"
    )
    sys.stdout.flush()
    return results


if __name__ == "__main__":
    main()
