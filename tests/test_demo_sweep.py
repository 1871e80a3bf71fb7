"""`python -m clip_rc.toy.demo_sweep`: seeds, rows, targets and the table, from small hand-made demo results."""

import json

import pytest

from clip_rc.metrics import harmonic_mean
from clip_rc.toy.demo_sweep import format_sweep_table, main, missed_targets, parse_seeds, sweep_rows


UNSEEN = ["melon", "donut", "tile"]


def _result(seed, seen, unseen_ious, control_unseen_ious, seconds=300.0, quick=False):
    """A demo's results.json with the figures the sweep reads (seen classes: one class 'cherry')."""
    unseen = sum(unseen_ious) / 3
    control_unseen = sum(control_unseen_ious) / 3
    return {
        "seed": seed,
        "quick": quick,
        "table": {
            "CLIP trained on captions": {"mIoU(S)": seen, "mIoU(U)": unseen, "hIoU": harmonic_mean(seen, unseen)},
            "control: CLIP never trained": {"mIoU(S)": 60.0, "mIoU(U)": control_unseen, "hIoU": 0.0},
        },
        "per_class_iou": {
            "caption-clip": {"cherry": seen, **dict(zip(UNSEEN, unseen_ious))},
            "control": {"cherry": 60.0, **dict(zip(UNSEEN, control_unseen_ious))},
        },
        "timings_seconds": {"total": seconds},
        "benchmark": {"name": "synthetic-shapes", "unseen_class_names": UNSEEN},
    }


def test_parse_seeds():
    assert parse_seeds("0-9") == list(range(10))
    assert parse_seeds("0-2,5, 7") == [0, 1, 2, 5, 7]
    assert parse_seeds("3,1,3") == [3, 1]
    for bad in ("", "a", "5-2", "1-x"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)


def test_rows_margins_and_targets():
    results = {
        1: _result(1, 80.0, [70.0, 60.0, 80.0], [30.0, 65.0, 10.0], seconds=290.0),
        0: _result(0, 74.0, [90.0, 90.0, 90.0], [10.0, 20.0, 30.0], seconds=310.0),
    }
    rows = sweep_rows(results)
    assert [row["seed"] for row in rows] == [0, 1]
    assert rows[1]["mIoU(U)"] == pytest.approx(70.0)
    assert rows[1]["worst class"] == "donut" and rows[1]["worst margin"] == pytest.approx(-5.0)
    assert rows[0]["worst class"] == "tile" and rows[0]["worst margin"] == pytest.approx(60.0)
    assert rows[0]["control mIoU(U)"] == pytest.approx(20.0)
    assert missed_targets(rows, min_seen=75, min_unseen=60) == [
        "seed 0: seen mIoU 74.00 < 75",
        "seed 1: not above the control on donut (-5.00)",
    ]
    assert missed_targets(rows, min_seen=70, min_unseen=60) == ["seed 1: not above the control on donut (-5.00)"]


def test_table_has_a_row_per_seed_and_mean_min_max():
    results = {seed: _result(seed, 80.0 + seed, [70.0 + seed] * 3, [20.0] * 3, 300.0 + seed) for seed in range(3)}
    lines = format_sweep_table(sweep_rows(results)).splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == [
        "seed", "mIoU(S)", "mIoU(U)", "hIoU", "melon", "donut", "tile", "control mIoU(S)", "control mIoU(U)",
        "worst margin", "worst class", "seconds",
    ]  # fmt: skip
    assert len(lines) == 2 + 3 + 3
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]] for line in lines[2:]}
    assert cells["0"][:2] == ["80.0", "70.0"] and cells["2"][-1] == "302.0"
    assert cells["**mean**"][:2] == ["81.0", "71.0"]
    assert cells["**min**"][0] == "80.0" and cells["**max**"][0] == "82.0"
    assert cells["**max**"][header.index("worst class") - 1] == ""  # no mean of names
    assert cells["**min**"][header.index("worst margin") - 1] == "50.0"


def test_table_only_writes_the_sweep_from_given_runs(tmp_path, capsys):
    for seed, unseen in ((0, [70.0, 75.0, 80.0]), (1, [65.0, 70.0, 72.0]), (2, [10.0, 10.0, 10.0])):
        folder = tmp_path / f"seed-{seed}"
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps(_result(seed, 80.0, unseen, [20.0, 30.0, 25.0])))
    # a quick run of another seed is not part of a full sweep
    (tmp_path / "seed-3").mkdir()
    (tmp_path / "seed-3" / "results.json").write_text(json.dumps(_result(3, 10.0, [1.0] * 3, [0.0] * 3, quick=True)))

    rows = main(["--seeds", "0-1,3", "--output_dir", str(tmp_path), "--table_only"])
    assert [row["seed"] for row in rows] == [0, 1]
    table = (tmp_path / "sweep.md").read_text()
    assert table.count("\n") == 2 + 2 + 3
    assert "| 1 | 80.0 | 69.0 |" in table
    assert table.strip() in capsys.readouterr().out
    record = json.loads((tmp_path / "sweep.json").read_text())
    assert record["missed_targets"] == [] and [row["seed"] for row in record["rows"]] == [0, 1]

    # seed 2 misses the unseen target: the table is still written, and the exit status says so
    with pytest.raises(SystemExit) as exit_info:
        main(["--seeds", "0-2", "--output_dir", str(tmp_path), "--table_only"])
    assert exit_info.value.code == 1
    assert json.loads((tmp_path / "sweep.json").read_text())["missed_targets"] == [
        "seed 2: unseen mIoU 10.00 < 60.0",
        "seed 2: not above the control on donut (-20.00)",
    ]


def test_bad_results_are_named(tmp_path):
    (tmp_path / "seed-0").mkdir()
    (tmp_path / "seed-0" / "results.json").write_text(json.dumps({"seed": 0}))
    with pytest.raises(ValueError, match=r"seed-0/results.json: not the results.json of a demo \(missing quick"):
        main(["--seeds", "0", "--output_dir", str(tmp_path), "--table_only"])
