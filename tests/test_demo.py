"""`clip-rc-demo --quick` end to end: data, tiny CLIP, CLIP-RC from it and from a caption-untrained control,
evaluation, the comparison figure and the seen / unseen / hIoU table (about 1.5 minutes on 2 CPU cores); and the
progress lines the demo makes of the training scripts' output."""

import json
import logging
import re

import numpy as np
import PIL.Image
import pytest

from clip_rc.toy.demo import TrainingProgress, format_demo_table, main, parse_demo_table
from clip_rc.toy.demo_figure import comparison_figure, figure_size, pick_rows


def test_demo_table_round_trips():
    rows = {"a run": {"mIoU(S)": 71.25, "mIoU(U)": 40.5, "hIoU": 51.64, "mIoU": 63.56, "pAcc": 80.0}}
    assert parse_demo_table("some text\n" + format_demo_table(rows) + "\nmore text") == rows


def test_training_lines_become_progress_lines(caplog):
    caplog.set_level(logging.INFO, logger="clip_rc.toy.demo")
    progress = TrainingProgress("caption-clip", total_steps=800)
    step = (
        "12:00:00 INFO clip_rc.commands.train: [RANK 0] step {}: loss={}, loss_focal=0.75, lr_head=0.001, epoch=1.06"
    )
    progress.report(step.format(100, 1.25), elapsed=50.0)
    progress.report("12:00:00 INFO clip_rc.commands.train: [RANK 0]   Parameter groups = {}", 51.0)
    progress.report(step.format(200, 0.5), elapsed=80.0)
    progress.report("12:00:01 WARNING py.warnings: something odd", 82.0)
    progress.report("12:03:00 INFO clip_rc.commands.train: Training done: 800 iterations in 190.0s", 260.0)
    assert [(record.levelname, record.getMessage()) for record in caplog.records] == [
        # 100 steps in 50 s (start-up included): 700 more take 350 s
        ("INFO", "caption-clip: step 100/800, loss 1.25, 0:50 elapsed, ETA 5:50"),
        # then the pace since the first step line: 100 steps in 30 s, 600 more take 180 s
        ("INFO", "caption-clip: step 200/800, loss 0.5, 1:20 elapsed, ETA 3:00"),
        ("WARNING", "caption-clip: 12:00:01 WARNING py.warnings: something odd"),
        ("INFO", "caption-clip: Training done: 800 iterations in 190.0s"),
    ]


def test_figure_rows_show_the_unseen_classes():
    truths = [np.full((4, 4), 255, dtype=np.uint8) for _ in range(5)]
    truths[1][:2] = 0  # seen only
    truths[2][:1] = 9  # 4 melon pixels
    truths[3][:3] = 10  # 12 donut pixels
    truths[4][:1], truths[4][3:] = 9, 11  # 4 melon, 4 tile pixels
    # donut first (most unseen pixels), then the image adding melon and tile, then the most unseen pixels
    assert pick_rows(truths, (9, 10, 11), 3) == [3, 4, 2]
    assert pick_rows(truths, (9, 10, 11), 9) == [3, 4, 2, 1, 0]


def test_comparison_figure_layout(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(2)]
    truths = [rng.choice([0, 9, 255], (24, 24)).astype(np.uint8) for _ in range(2)]
    predictions = {
        "run a": [rng.integers(0, 12, (24, 24)).astype(np.uint8)] * 2,
        "run b": [np.zeros((24, 24), np.uint8)] * 2,
    }
    ious = {"run a": [0.5] * 12, "run b": [0.2] * 11 + [float("nan")]}
    names = [f"class{k}" for k in range(12)]
    path = comparison_figure(tmp_path / "figure.png", images, truths, predictions, ious, names, (9, 10, 11))
    with PIL.Image.open(path) as image:
        assert image.size == figure_size(2)
    assert figure_size(4)[1] - figure_size(2)[1] == 2 * (figure_size(3)[1] - figure_size(2)[1]) > 0


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="clip_rc")
    output_dir = tmp_path / "demo"
    results = main(["--quick", "--output_dir", str(output_dir)])

    for path in (
        "data/dataset_dict.json", "data/benchmark.json",
        "clip/config.json", "clip/model.safetensors", "clip/tokenizer.json", "clip/preprocessor_config.json",
        "clip-control/config.json", "clip-control/tokenizer.json",
        "caption-clip/model/config.json", "control/model/config.json",
        "caption-clip/eval/metrics.json", "control/eval/metrics.json",
        "caption-clip/train.log", "control/train.log", "results.md", "results.json", "demo.log", "comparison.png",
    ):  # fmt: skip
        assert (output_dir / path).is_file(), path
    with PIL.Image.open(output_dir / "comparison.png") as figure:
        assert figure.size == figure_size(4)
    for run in ("caption-clip", "control"):
        assert len(list((output_dir / "predictions" / run).glob("*_labels.png"))) == 4
    # the training script's own log lines reach the run's log (it runs as `python -m clip_rc.commands.train`)
    train_log = (output_dir / "caption-clip" / "train.log").read_text()
    assert re.search(r"INFO clip_rc\.commands\.train: (\[RANK 0\] )?step 100: loss=", train_log)
    # ... and both runs' progress reaches the console while they train, and the demo's log
    console = [record.getMessage() for record in caplog.records if record.name == "clip_rc.toy.demo"]
    demo_log = (output_dir / "demo.log").read_text()
    for run in ("caption-clip", "control"):
        pattern = rf"{run}: step \d+/100, loss \S+, \d+:\d\d elapsed, ETA \d+:\d\d"
        progress = [line for line in console if re.fullmatch(pattern, line)]
        assert len(progress) >= 10, console
        assert progress[-1].startswith(f"{run}: step 100/100") and progress[-1] in demo_log
    for stage in ("data", "tiny CLIP", "CLIP-RC training", "evaluation", "figure"):
        assert re.search(rf"\[\d/5\] {stage}: ", demo_log) and re.search(rf"\[\d/5\] {stage} done in", demo_log), stage
    assert "tiny CLIP step 50/70" in demo_log

    printed = capsys.readouterr().out
    table = parse_demo_table(printed)
    assert table == parse_demo_table((output_dir / "results.md").read_text())
    trained, control = table["CLIP trained on captions"], table["control: CLIP never trained"]
    assert set(trained) == {"mIoU(S)", "mIoU(U)", "hIoU", "mIoU", "pAcc"}
    # the zero-shot effect: classes never segmented in training are found from their names only with the CLIP
    # that learned the names from captions
    assert trained["mIoU(U)"] > control["mIoU(U)"]
    metrics = json.loads((output_dir / "caption-clip" / "eval" / "metrics.json").read_text())
    assert abs(100 * metrics["mean_iou_unseen"] - trained["mIoU(U)"]) < 0.01
    assert (
        results["probe"]["caption-clip"]["unseen_pixel_accuracy"]
        > results["probe"]["control"]["unseen_pixel_accuracy"]
    )
    assert results["per_class_iou"]["caption-clip"]["melon"] == round(100 * metrics["per_category_iou"][9], 2)
    assert set(results["timings_seconds"]) == {
        "data",
        "tiny CLIP",
        "CLIP-RC training",
        "evaluation",
        "figure",
        "total",
    }
