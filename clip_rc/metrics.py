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
"""Zero-shot semantic segmentation metrics (SPEC §7).

[`SegmentationMetric`] accumulates per-class pixel counts over a whole evaluation set, with memory independent of the
number of images, and reports the figures of `evaluate`'s `mean_iou` metric (same keys, same semantics) plus the
zero-shot split figures: mIoU over the seen classes, over the unseen classes and their harmonic mean (hIoU).

[`compute_with_evaluate`] and [`cross_check`] score the same maps through `evaluate.load(...)` and compare the results.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


LabelMaps = torch.Tensor | np.ndarray

# Keys of the totals, in the order they are stacked for the cross-process reduction.
_TOTAL_KEYS = ("total_area_intersect", "total_area_union", "total_area_pred_label", "total_area_label")


def nanmean(values: np.ndarray) -> float:
    """`np.nanmean` without the "Mean of empty slice" warning: NaN when every value is NaN (or there are none)."""
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else float("nan")


def harmonic_mean(seen: float, unseen: float) -> float:
    """hIoU = 2·S·U / (S + U); NaN if either side is NaN, 0 if both are 0 (the limit of the harmonic mean)."""
    if math.isnan(seen) or math.isnan(unseen):
        return float("nan")
    if seen + unseen == 0:
        return 0.0
    return 2 * seen * unseen / (seen + unseen)


class SegmentationMetric:
    r"""
    Streaming IoU / accuracy for semantic segmentation, with the semantics of `evaluate`'s `mean_iou` metric
    (`reduce_labels=False`, no `label_map`).

    Per class, four int64 counters of shape `(num_labels,)` are summed over every [`~SegmentationMetric.update`] call:
    `total_area_intersect`, `total_area_union`, `total_area_pred_label` and `total_area_label`. Pixels whose reference
    is `ignore_index` are dropped from predictions and references alike. IoU is intersection / union of the totals over
    the whole set (not a mean of per-image IoUs).

    Unlike `mean_iou`, which silently drops out-of-range ids through its histogram range, an id outside
    `[0, num_labels)` at a non-ignored pixel raises a `ValueError`, in predictions as well as in references. On valid
    inputs both give the same numbers.

    Args:
        num_labels (`int`):
            Number of classes; valid label ids are `0 .. num_labels - 1`.
        ignore_index (`int`, *optional*, defaults to 255):
            Reference value of pixels left out of every count.
        seen_class_ids (`Sequence[int]`, *optional*):
            Ids of the classes seen in training. The others are the unseen classes. Defaults to every class
            (fully supervised setting: no unseen split, so `mean_iou_unseen` and `harmonic_iou` are NaN).
        class_names (`Sequence[str]`, *optional*):
            One name per class, used by [`~SegmentationMetric.format_table`].
        device (`str` or `torch.device`, *optional*):
            Device holding the totals and doing the counting. Defaults to CPU. With the NCCL backend it must be the
            process' GPU (e.g. `accelerator.device`) for [`~SegmentationMetric.reduce`] to work.

    Example:

    ```python
    >>> metric = SegmentationMetric(num_labels=20, seen_class_ids=range(15))
    >>> for batch in dataloader:  # doctest: +SKIP
    ...     metric.update(model_predictions(batch), batch["labels"])
    >>> results = metric.compute()  # doctest: +SKIP
    >>> results["harmonic_iou"]  # doctest: +SKIP
    ```
    """

    def __init__(
        self,
        num_labels: int,
        ignore_index: int = 255,
        seen_class_ids: Sequence[int] | None = None,
        class_names: Sequence[str] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if num_labels < 1:
            raise ValueError(f"num_labels must be at least 1, got {num_labels}.")
        self.num_labels = int(num_labels)
        self.ignore_index = int(ignore_index)
        self.device = torch.device(device) if device is not None else torch.device("cpu")

        if seen_class_ids is None:
            seen_class_ids = range(self.num_labels)
        seen = [int(class_id) for class_id in seen_class_ids]
        out_of_range = sorted({class_id for class_id in seen if not 0 <= class_id < self.num_labels})
        if out_of_range:
            raise ValueError(f"seen_class_ids {out_of_range} are outside [0, {self.num_labels}).")
        if len(set(seen)) != len(seen):
            raise ValueError(f"seen_class_ids contains duplicates: {seen}.")
        self.seen_class_ids: list[int] = sorted(seen)
        self.unseen_class_ids: list[int] = sorted(set(range(self.num_labels)) - set(seen))

        if class_names is not None and len(class_names) != self.num_labels:
            raise ValueError(f"Got {len(class_names)} class_names for num_labels={self.num_labels}.")
        self.class_names = list(class_names) if class_names is not None else None

        self.reset()

    def reset(self) -> None:
        """Set every total back to zero."""
        for key in _TOTAL_KEYS:
            setattr(self, key, torch.zeros(self.num_labels, dtype=torch.int64, device=self.device))

    def _as_label_tensor(self, maps: LabelMaps, name: str) -> torch.Tensor:
        """Integer tensor or array of any shape -> int64 tensor on `self.device`."""
        if isinstance(maps, torch.Tensor):
            if maps.dtype.is_floating_point or maps.dtype.is_complex or maps.dtype == torch.bool:
                raise TypeError(f"{name} must hold integer label ids, got dtype {maps.dtype}.")
            return maps.to(device=self.device, dtype=torch.int64)
        maps = np.asarray(maps)
        if not np.issubdtype(maps.dtype, np.integer):
            raise TypeError(f"{name} must hold integer label ids, got dtype {maps.dtype}.")
        return torch.from_numpy(maps.astype(np.int64, copy=False)).to(self.device)

    def _check_label_ids(self, label_ids: torch.Tensor, name: str) -> None:
        """Raise if any (already ignore-filtered) id is outside `[0, num_labels)`, naming the offending ids."""
        bad_ids = label_ids[(label_ids < 0) | (label_ids >= self.num_labels)]
        if bad_ids.numel():
            shown = torch.unique(bad_ids)[:10].tolist()
            raise ValueError(
                f"{name} contain label id(s) {shown} outside [0, {self.num_labels}) at pixels whose reference is not "
                f"ignore_index={self.ignore_index}."
            )

    @torch.no_grad()
    def update(self, predictions: LabelMaps, references: LabelMaps) -> None:
        """
        Add one map or a batch of maps to the totals.

        Args:
            predictions (`torch.Tensor` or `np.ndarray` of shape `(height, width)` or `(batch_size, height, width)`):
                Predicted label ids, any integer dtype. Values at ignored pixels are not looked at.
            references (`torch.Tensor` or `np.ndarray`, same shape as `predictions`):
                Ground-truth label ids, any integer dtype; `ignore_index` marks pixels to leave out.
        """
        predictions = self._as_label_tensor(predictions, "predictions")
        references = self._as_label_tensor(references, "references")
        if predictions.shape != references.shape:
            raise ValueError(
                f"predictions shape {tuple(predictions.shape)} does not match references shape "
                f"{tuple(references.shape)}."
            )
        if predictions.dim() not in (2, 3):
            raise ValueError(
                "Expected maps of shape (height, width) or (batch_size, height, width), got "
                f"{tuple(predictions.shape)}."
            )

        valid = references != self.ignore_index
        predictions = predictions[valid]
        references = references[valid]
        self._check_label_ids(references, "references")
        self._check_label_ids(predictions, "predictions")

        area_intersect = torch.bincount(references[predictions == references], minlength=self.num_labels)
        area_pred_label = torch.bincount(predictions, minlength=self.num_labels)
        area_label = torch.bincount(references, minlength=self.num_labels)
        self.total_area_intersect += area_intersect
        self.total_area_union += area_pred_label + area_label - area_intersect
        self.total_area_pred_label += area_pred_label
        self.total_area_label += area_label

    def reduce(self) -> SegmentationMetric:
        """
        Copy of this metric whose totals are summed over all processes, with `torch.distributed.all_reduce`.

        Works with any launcher that initialises the default process group (`accelerate launch`, `torchrun`). Without
        an initialised process group (single process) this is a plain copy. The totals of `self` are left untouched,
        so calling it twice never double counts. It is a collective call: every process must call it.

        Note: a `DistributedSampler` pads the last batches with repeated samples, which get counted twice; evaluate
        with a sampler that does not pad (e.g. `Accelerator(even_batches=False)`) for exact figures.
        """
        reduced = SegmentationMetric(
            self.num_labels, self.ignore_index, self.seen_class_ids, self.class_names, device=self.device
        )
        # One collective for the four totals instead of four.
        stacked = torch.stack([getattr(self, key) for key in _TOTAL_KEYS])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        for key, total in zip(_TOTAL_KEYS, stacked):
            setattr(reduced, key, total.clone())
        return reduced

    def compute(self, sync: bool = True) -> dict[str, Any]:
        """
        Figures over everything seen so far, as fractions in `[0, 1]`.

        Args:
            sync (`bool`, *optional*, defaults to `True`):
                Sum the totals over all processes first (see [`~SegmentationMetric.reduce`]; then every process must
                call `compute`). With `False`, report this process' totals only.

        Returns:
            `dict[str, Any]` with the keys and semantics of `evaluate`'s `mean_iou`:
            - **mean_iou** (`float`) -- mean of `per_category_iou`, NaN entries left out.
            - **mean_accuracy** (`float`) -- mean of `per_category_accuracy`, NaN entries left out.
            - **overall_accuracy** (`float`) -- correctly predicted pixels / labelled pixels (pixel accuracy).
            - **per_category_iou** (`np.ndarray` of shape `(num_labels,)`) -- NaN for classes absent from both
              predictions and references.
            - **per_category_accuracy** (`np.ndarray` of shape `(num_labels,)`) -- NaN for classes without reference
              pixels.
            plus the zero-shot split:
            - **mean_iou_seen**, **mean_iou_unseen** (`float`) -- mean IoU over the seen / unseen classes (NaN
              entries left out; NaN when there is no unseen class).
            - **harmonic_iou** (`float`) -- hIoU = 2·S·U / (S + U) of the two means above; NaN when either is NaN,
              notably in the fully supervised setting with no unseen class (the key is always present).
            - **seen_class_ids**, **unseen_class_ids** (`list[int]`).
        """
        metric = self.reduce() if sync else self
        intersect, union, _, label = (getattr(metric, key).cpu().double().numpy() for key in _TOTAL_KEYS)

        # 0 / 0 -> NaN is the intended marker for absent classes.
        with np.errstate(divide="ignore", invalid="ignore"):
            per_category_iou = intersect / union
            per_category_accuracy = intersect / label
            overall_accuracy = float(intersect.sum() / label.sum())

        mean_iou_seen = nanmean(per_category_iou[self.seen_class_ids])
        mean_iou_unseen = nanmean(per_category_iou[self.unseen_class_ids])
        return {
            "mean_iou": nanmean(per_category_iou),
            "mean_accuracy": nanmean(per_category_accuracy),
            "overall_accuracy": overall_accuracy,
            "per_category_iou": per_category_iou,
            "per_category_accuracy": per_category_accuracy,
            "mean_iou_seen": mean_iou_seen,
            "mean_iou_unseen": mean_iou_unseen,
            "harmonic_iou": harmonic_mean(mean_iou_seen, mean_iou_unseen),
            "seen_class_ids": list(self.seen_class_ids),
            "unseen_class_ids": list(self.unseen_class_ids),
        }


def format_results_table(results: Mapping[str, Any], class_names: Sequence[str] | None = None) -> str:
    """
    Per-class table (id, class name, IoU %, Acc %, seen / unseen) followed by a summary line, for terminal output.

    Args:
        results (`Mapping[str, Any]`):
            Output of [`SegmentationMetric.compute`].
        class_names (`Sequence[str]`, *optional*):
            One name per class; defaults to the class ids.

    Returns:
        `str`: the table, without trailing newline. NaN figures (absent classes) are shown as `n/a`.
    """

    def percent(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{100 * value:.2f}"

    per_category_iou = np.asarray(results["per_category_iou"])
    per_category_accuracy = np.asarray(results["per_category_accuracy"])
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(per_category_iou))]
    unseen_ids = set(results["unseen_class_ids"])
    name_width = max(len("class"), *(len(name) for name in names))

    lines = [f"{'id':>4}  {'class':<{name_width}}  {'IoU %':>7}  {'Acc %':>7}  split"]
    for class_id, name in enumerate(names):
        split = "unseen" if class_id in unseen_ids else "seen"
        lines.append(
            f"{class_id:>4}  {name:<{name_width}}  {percent(per_category_iou[class_id]):>7}  "
            f"{percent(per_category_accuracy[class_id]):>7}  {split}"
        )
    lines.append(
        f"mIoU {percent(results['mean_iou'])} | mIoU(S) {percent(results['mean_iou_seen'])} | "
        f"mIoU(U) {percent(results['mean_iou_unseen'])} | hIoU {percent(results['harmonic_iou'])} | "
        f"pAcc {percent(results['overall_accuracy'])} | mAcc {percent(results['mean_accuracy'])}"
    )
    return "\n".join(lines)


def _to_numpy_map(label_map: LabelMaps) -> np.ndarray:
    """One (height, width) map as the smallest lossless numpy dtype for an image feature."""
    array = label_map.detach().cpu().numpy() if isinstance(label_map, torch.Tensor) else np.asarray(label_map)
    # `mean_iou` declares `datasets.Image()` features, which store each map as an image: uint8 is a lossless PNG,
    # while int64 would be downcast with a warning.
    if array.size and array.min() >= 0 and array.max() <= 255:
        return array.astype(np.uint8)
    return array.astype(np.int32)


def compute_with_evaluate(
    predictions: Iterable[LabelMaps],
    references: Iterable[LabelMaps],
    num_labels: int,
    ignore_index: int = 255,
    metric_path: str = "mean_iou",
) -> dict[str, Any]:
    """
    Score maps with `evaluate.load(metric_path)` (`reduce_labels=False`), as a reference for [`SegmentationMetric`].

    `metric_path` is a Hub name (`"mean_iou"`, which needs the Hub or a warm `evaluate` cache) or a local folder
    `<dir>/<name>` holding the metric script `<name>.py`. Loading a local folder never touches the Hub, so it works
    offline without `HF_HUB_OFFLINE` / `HF_EVALUATE_OFFLINE`. Beware that a bare name is first looked up as a folder
    of the current working directory.

    Args:
        predictions (`Iterable` of `torch.Tensor` / `np.ndarray` of shape `(height, width)`):
            Predicted maps; a `(batch_size, height, width)` tensor or array also works. Maps may differ in size.
        references (`Iterable` of `torch.Tensor` / `np.ndarray` of shape `(height, width)`):
            Ground-truth maps, one per prediction.
        num_labels (`int`):
            Number of classes.
        ignore_index (`int`, *optional*, defaults to 255):
            Reference value of pixels to leave out.
        metric_path (`str`, *optional*, defaults to `"mean_iou"`):
            What to pass to `evaluate.load`.

    Returns:
        `dict[str, Any]`: the metric's own result dictionary.
    """
    # Imported here: `evaluate` (and `datasets`) is only needed for this cross-check, not for training or inference.
    import evaluate

    metric = evaluate.load(metric_path)
    return metric.compute(
        predictions=[_to_numpy_map(prediction) for prediction in predictions],
        references=[_to_numpy_map(reference) for reference in references],
        num_labels=num_labels,
        ignore_index=ignore_index,
        reduce_labels=False,
    )


def cross_check(ours: Mapping[str, Any], theirs: Mapping[str, Any], atol: float = 1e-6) -> None:
    """
    Check that every figure of `theirs` (e.g. from [`compute_with_evaluate`]) matches `ours` within `atol`.

    NaN matches NaN only. Keys only in `ours` (the seen / unseen figures) are not compared.

    Raises:
        `ValueError`: listing every key that is missing from `ours` or whose values differ.
    """
    mismatches = []
    for key, their_value in theirs.items():
        if key not in ours:
            mismatches.append(f"{key}: missing from ours")
            continue
        our_array = np.asarray(ours[key], dtype=np.float64)
        their_array = np.asarray(their_value, dtype=np.float64)
        if our_array.shape != their_array.shape:
            mismatches.append(f"{key}: shape {our_array.shape} (ours) vs {their_array.shape} (theirs)")
            continue
        close = np.isclose(our_array, their_array, rtol=0.0, atol=atol, equal_nan=True)
        if not close.all():
            if our_array.ndim == 0:
                mismatches.append(f"{key}: ours={our_array.item()!r} theirs={their_array.item()!r}")
            else:
                indices = np.flatnonzero(~close).tolist()
                mismatches.append(
                    f"{key}: differs at indices {indices}: ours={our_array.ravel()[indices].tolist()} "
                    f"theirs={their_array.ravel()[indices].tolist()}"
                )
    if mismatches:
        raise ValueError(f"Metrics differ (atol={atol}) on {len(mismatches)} key(s):\n  " + "\n  ".join(mismatches))
