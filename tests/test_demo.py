"""`clip-rc-demo --quick` end to end: data, tiny CLIP, CLIP-RC from it and from a caption-untrained control,
evaluation, overlays and the seen / unseen / hIoU table (about two minutes on 2 CPU cores)."""

import json
import re

from clip_rc.toy.demo import format_demo_table, main, parse_demo_table


def test_demo_table_round_trips():
    rows = {"a run": {"mIoU(S)": 71.25, "mIoU(U)": 40.5, "hIoU": 51.64, "mIoU": 63.56, "pAcc": 80.0}}
    assert parse_demo_table("some text\n" + format_demo_table(rows) + "\nmore text") == rows


def test_quick_demo_end_to_end(tmp_path, capsys):
    output_dir = tmp_path / "demo"
    results = main(["--quick", "--output_dir", str(output_dir)])

    for path in (
        "data/dataset_dict.json", "data/benchmark.json",
        "clip/config.json", "clip/model.safetensors", "clip/tokenizer.json", "clip/preprocessor_config.json",
        "clip-control/config.json", "clip-control/tokenizer.json",
        "caption-clip/model/config.json", "control/model/config.json",
        "caption-clip/eval/metrics.json", "control/eval/metrics.json",
        "caption-clip/train.log", "results.md", "results.json",
    ):  # fmt: skip
        assert (output_dir / path).is_file(), path
    assert len(list((output_dir / "predictions").glob("*_overlay.png"))) >= 1
    # the training script's own log lines reach the run's log (it runs as `python -m clip_rc.commands.train`)
    train_log = (output_dir / "caption-clip" / "train.log").read_text()
    assert re.search(r"INFO clip_rc\.training: (\[RANK 0\] )?step 100: loss=", train_log)

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
    assert results["probe"]["caption-clip"]["unseen_pixel_accuracy"] > results["probe"]["control"]["unseen_pixel_accuracy"]
