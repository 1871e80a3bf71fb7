# Copyright 2024 The CLIP-RC Authors and The HuggingFace Team. All rights reserved.
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
"""Tests for `clip_rc.metrics`."""

import math
import socket
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clip_rc.metrics import SegmentationMetric, compute_with_evaluate, cross_check, format_results_table

from .local_metric import local_metric


TOTAL_KEYS = ("total_area_intersect", "total_area_union", "total_area_pred_label", "total_area_label")

# 5 classes; the bottom-right pixel is ignored (its prediction, 4, must not count). Class 2 is only predicted,
# class 4 only appears at the ignored pixel, i.e. it is absent.
REFERENCE = np.array([[0, 0, 1, 1], [1, 3, 3, 255]])
PREDICTION = np.array([[0, 2, 1, 1], [0, 3, 1, 4]])
# Hand counts per class 0..4.
INTERSECT = [1, 2, 0, 1, 0]
PRED_LABEL = [2, 3, 1, 1, 0]
LABEL = [2, 3, 0, 2, 0]
UNION = [3, 4, 1, 2, 0]


def random_maps(seed: int, num_maps: int, num_labels: int, ignore_index: int = 255):
    """Maps of varying sizes with ~10% ignored pixels; predictions are right ~half of the time."""
    rng = np.random.default_rng(seed)
    predictions, references = [], []
    for _ in range(num_maps):
        height, width = rng.integers(3, 12, size=2)
        reference = rng.integers(0, num_labels, size=(height, width))
        reference[rng.random((height, width)) < 0.1] = ignore_index
        wrong = rng.integers(0, num_labels, size=(height, width))
        prediction = np.where(rng.random((height, width)) < 0.5, reference, wrong)
        prediction[reference == ignore_index] = rng.integers(0, 256, size=int((reference == ignore_index).sum()))
        predictions.append(prediction)
        references.append(reference)
    return predictions, references


def assert_results_equal(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(np.asarray(first[key]), np.asarray(second[key]), err_msg=key)


def test_hand_computed_iou_with_ignore_and_absent_classes():
    metric = SegmentationMetric(num_labels=5, seen_class_ids=[0, 1, 2])
    metric.update(PREDICTION, REFERENCE)

    assert metric.total_area_intersect.tolist() == INTERSECT
    assert metric.total_area_union.tolist() == UNION
    assert metric.total_area_pred_label.tolist() == PRED_LABEL
    assert metric.total_area_label.tolist() == LABEL

    results = metric.compute()
    nan = float("nan")
    np.testing.assert_allclose(results["per_category_iou"], [1 / 3, 1 / 2, 0, 1 / 2, nan])
    np.testing.assert_allclose(results["per_category_accuracy"], [1 / 2, 2 / 3, nan, 1 / 2, nan])
    # Absent classes (NaN) are left out of the means, like `mean_iou`'s nanmean.
    assert results["mean_iou"] == pytest.approx((1 / 3 + 1 / 2 + 0 + 1 / 2) / 4)
    assert results["mean_accuracy"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
    assert results["overall_accuracy"] == pytest.approx(4 / 7)

    assert results["seen_class_ids"] == [0, 1, 2]
    assert results["unseen_class_ids"] == [3, 4]
    seen, unseen = 5 / 18, 1 / 2  # (1/3 + 1/2 + 0) / 3 and class 3 alone (class 4 is NaN)
    assert results["mean_iou_seen"] == pytest.approx(seen)
    assert results["mean_iou_unseen"] == pytest.approx(unseen)
    assert results["harmonic_iou"] == pytest.approx(2 * seen * unseen / (seen + unseen))
    assert results["harmonic_iou"] == pytest.approx(5 / 14)


def test_no_unseen_split_gives_nan_unseen_and_harmonic():
    metric = SegmentationMetric(num_labels=5)
    metric.update(PREDICTION, REFERENCE)
    results = metric.compute()

    assert results["unseen_class_ids"] == []
    assert results["seen_class_ids"] == [0, 1, 2, 3, 4]
    assert results["mean_iou_seen"] == results["mean_iou"]
    assert math.isnan(results["mean_iou_unseen"])
    assert math.isnan(results["harmonic_iou"])


def test_harmonic_iou_is_zero_when_both_sides_are_zero():
    metric = SegmentationMetric(num_labels=2, seen_class_ids=[0])
    metric.update(np.array([[1, 0]]), np.array([[0, 1]]))
    results = metric.compute()
    assert results["mean_iou_seen"] == 0.0
    assert results["mean_iou_unseen"] == 0.0
    assert results["harmonic_iou"] == 0.0


def test_empty_metric_is_all_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results = SegmentationMetric(num_labels=3, seen_class_ids=[0]).compute()
    for key in ("mean_iou", "mean_accuracy", "overall_accuracy", "mean_iou_seen", "mean_iou_unseen", "harmonic_iou"):
        assert math.isnan(results[key]), key
    assert np.isnan(results["per_category_iou"]).all()


def test_streaming_equals_one_shot_on_the_concatenation():
    num_labels = 7
    predictions, references = random_maps(seed=0, num_maps=30, num_labels=num_labels)

    streamed = SegmentationMetric(num_labels, seen_class_ids=[0, 1, 2, 3])
    for prediction, reference in zip(predictions, references):
        streamed.update(prediction, reference)
    # Batched (B, H, W) updates must count the same as single maps.
    streamed.update(np.stack([predictions[0]] * 3), np.stack([references[0]] * 3))

    concatenated_predictions = np.concatenate([p.ravel() for p in predictions] + [predictions[0].ravel()] * 3)
    concatenated_references = np.concatenate([r.ravel() for r in references] + [references[0].ravel()] * 3)
    one_shot = SegmentationMetric(num_labels, seen_class_ids=[0, 1, 2, 3])
    one_shot.update(concatenated_predictions[None], concatenated_references[None])

    for key in TOTAL_KEYS:
        assert torch.equal(getattr(streamed, key), getattr(one_shot, key)), key
    assert_results_equal(streamed.compute(), one_shot.compute())


def test_torch_and_numpy_inputs_give_identical_results():
    predictions, references = random_maps(seed=1, num_maps=5, num_labels=6)
    variants = {
        "numpy int64": lambda m: m.astype(np.int64),
        "numpy uint8": lambda m: m.astype(np.uint8),
        "numpy int32": lambda m: m.astype(np.int32),
        "torch int64": lambda m: torch.from_numpy(m),
        "torch uint8": lambda m: torch.from_numpy(m.astype(np.uint8)),
        "torch int16": lambda m: torch.from_numpy(m.astype(np.int16)),
    }
    results = {}
    for name, convert in variants.items():
        metric = SegmentationMetric(num_labels=6, seen_class_ids=[0, 1, 2])
        for prediction, reference in zip(predictions, references):
            metric.update(convert(prediction), convert(reference))
        results[name] = metric.compute()
    for name, result in results.items():
        assert_results_equal(result, results["numpy int64"])


def test_compute_does_not_mutate_totals():
    metric = SegmentationMetric(num_labels=5)
    metric.update(PREDICTION, REFERENCE)
    metric.compute()
    metric.compute(sync=False)
    assert metric.total_area_label.tolist() == LABEL


def _totals(metric: SegmentationMetric) -> dict[str, torch.Tensor]:
    return {key: getattr(metric, key).detach().cpu().clone() for key in TOTAL_KEYS}


def _reduce_worker(rank: int, world_size: int, port: int, shards, output_dir: str) -> None:
    """One process of the 2-process run: count its own shard, then sum over both processes."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        metric = SegmentationMetric(num_labels=6, seen_class_ids=[0, 1, 2])
        for prediction, reference in shards[rank]:
            metric.update(prediction, reference)
        local_state = _totals(metric)
        reduced_state = _totals(metric.reduce())
        results = metric.compute(sync=True)
        torch.save(
            {"local": local_state, "reduced": reduced_state, "results": results, "after": _totals(metric)},
            f"{output_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_reduction_matches_single_process(tmp_path):
    predictions, references = random_maps(seed=3, num_maps=8, num_labels=6)
    pairs = list(zip(predictions, references))
    shards = [pairs[:3], pairs[3:]]  # unequal shards on purpose

    mp.spawn(_reduce_worker, args=(2, _free_port(), shards, str(tmp_path)), nprocs=2, join=True)

    single = SegmentationMetric(num_labels=6, seen_class_ids=[0, 1, 2])
    for prediction, reference in pairs:
        single.update(prediction, reference)
    expected_results = single.compute()

    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for key in TOTAL_KEYS:
            assert torch.equal(saved["reduced"][key], getattr(single, key)), (rank, key)
            # The reduction works on a copy: the process' own totals stay local.
            assert torch.equal(saved["after"][key], saved["local"][key]), (rank, key)
        assert_results_equal(saved["results"], expected_results)
    local_sum = torch.load(tmp_path / "rank0.pt", weights_only=False)["local"]["total_area_label"]
    assert not torch.equal(local_sum, single.total_area_label)


def test_evaluate_backed_path_on_a_local_metric_folder_matches(tmp_path):
    pytest.importorskip("evaluate")
    folder = local_metric(tmp_path, "local_confusion_iou")

    predictions, references = random_maps(seed=4, num_maps=6, num_labels=5)
    predictions.append(PREDICTION)
    references.append(REFERENCE)  # brings the absent class 4 -> NaN IoU is then present in both results
    ours_metric = SegmentationMetric(num_labels=5, seen_class_ids=[0, 1, 2])
    for prediction, reference in zip(predictions, references):
        ours_metric.update(torch.from_numpy(prediction), reference)
    ours = ours_metric.compute()

    theirs = compute_with_evaluate(
        [torch.from_numpy(prediction) for prediction in predictions], references, num_labels=5, metric_path=folder
    )
    mean_iou_keys = {"mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", "per_category_accuracy"}
    assert set(theirs) == mean_iou_keys
    cross_check(ours, theirs)


def test_cross_check_raises_and_names_every_differing_key():
    metric = SegmentationMetric(num_labels=5)
    metric.update(PREDICTION, REFERENCE)
    ours = metric.compute()
    theirs = {key: ours[key] for key in ("mean_iou", "mean_accuracy", "overall_accuracy")}
    theirs["per_category_iou"] = ours["per_category_iou"].copy()
    theirs["per_category_accuracy"] = ours["per_category_accuracy"].copy()
    cross_check(ours, theirs)  # identical, NaNs included

    theirs["mean_iou"] = ours["mean_iou"] + 1e-3
    theirs["per_category_iou"][4] = 0.0  # NaN vs a number is a difference
    with pytest.raises(ValueError) as error:
        cross_check(ours, theirs)
    message = str(error.value)
    assert "mean_iou:" in message and "per_category_iou:" in message and "indices [4]" in message
    assert "mean_accuracy" not in message and "overall_accuracy" not in message

    with pytest.raises(ValueError, match="extra_key: missing from ours"):
        cross_check(ours, {"extra_key": 1.0})


def test_format_table_lists_every_class_with_its_split():
    metric = SegmentationMetric(
        num_labels=5, seen_class_ids=[0, 1, 2], class_names=["sky", "road", "tree", "cow", "giraffe"]
    )
    metric.update(PREDICTION, REFERENCE)
    table = format_results_table(metric.compute(), metric.class_names)
    lines = table.splitlines()
    assert len(lines) == 1 + 5 + 1
    assert lines[1].split() == ["0", "sky", "33.33", "50.00", "seen"]
    assert lines[3].split() == ["2", "tree", "0.00", "n/a", "seen"]
    assert lines[5].split() == ["4", "giraffe", "n/a", "n/a", "unseen"]
    assert "hIoU 35.71" in lines[-1]
    # Without names the ids are used.
    assert format_results_table(metric.compute()).splitlines()[2].split()[:2] == ["1", "1"]


def test_bad_inputs_raise():
    metric = SegmentationMetric(num_labels=5)
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 3\)"):
        metric.update(np.zeros((2, 4), dtype=np.int64), np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match=r"references contain label id\(s\) \[7\]"):
        metric.update(np.zeros((2, 2), dtype=np.int64), np.array([[0, 7], [255, 1]]))
    with pytest.raises(ValueError, match=r"predictions contain label id\(s\) \[9\]"):
        metric.update(np.array([[0, 9], [1, 1]]), np.array([[0, 1], [255, 1]]))
    with pytest.raises(ValueError, match=r"\[-1\]"):
        metric.update(torch.tensor([[0, -1]]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="height, width"):
        metric.update(np.zeros(4, dtype=np.int64), np.zeros(4, dtype=np.int64))
    with pytest.raises(TypeError, match="integer"):
        metric.update(np.zeros((2, 2)), np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(TypeError, match="integer"):
        metric.update(torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, 2))
    # A failed update leaves the totals untouched; out-of-range predictions at ignored pixels are fine.
    assert metric.total_area_label.sum() == 0
    metric.update(np.array([[0, 200]]), np.array([[0, 255]]))
    assert metric.total_area_label.tolist() == [1, 0, 0, 0, 0]

    with pytest.raises(ValueError, match=r"seen_class_ids \[5\]"):
        SegmentationMetric(num_labels=5, seen_class_ids=[0, 5])
    with pytest.raises(ValueError, match="duplicates"):
        SegmentationMetric(num_labels=5, seen_class_ids=[0, 0])
    with pytest.raises(ValueError, match="class_names"):
        SegmentationMetric(num_labels=5, class_names=["a"])
