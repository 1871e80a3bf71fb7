"""A local `evaluate` metric folder standing in for `mean_iou` (the Hub is unreachable in tests).

Written independently of `clip_rc.metrics`: it builds a confusion matrix per map. Like `mean_iou` it declares image
features, so maps go through the same `datasets` encoding. `evaluate` scans a metric script's imports line by line, so
each import stands on its own line.
"""

import textwrap
from pathlib import Path


LOCAL_METRIC = textwrap.dedent(
    """
    import datasets
    import evaluate
    import numpy as np


    class {name}(evaluate.Metric):
        def _info(self):
            return evaluate.MetricInfo(
                description="IoU from a confusion matrix (test stand-in for mean_iou).",
                citation="",
                inputs_description="predictions, references: lists of (H, W) label maps.",
                features=datasets.Features({{"predictions": datasets.Image(), "references": datasets.Image()}}),
            )

        def _compute(self, predictions, references, num_labels, ignore_index, reduce_labels=False):
            confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
            for prediction, reference in zip(predictions, references):
                prediction = np.asarray(prediction).astype(np.int64).ravel()
                reference = np.asarray(reference).astype(np.int64).ravel()
                keep = reference != ignore_index
                np.add.at(confusion, (reference[keep], prediction[keep]), 1)
            hits = np.diag(confusion).astype(np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                iou = hits / (confusion.sum(axis=1) + confusion.sum(axis=0) - hits)
                accuracy = hits / confusion.sum(axis=1)
            iou = iou {tamper}
            return {{
                "mean_iou": np.nanmean(iou),
                "mean_accuracy": np.nanmean(accuracy),
                "overall_accuracy": hits.sum() / confusion.sum(),
                "per_category_iou": iou,
                "per_category_accuracy": accuracy,
            }}
    """
)


def local_metric(root: Path, name: str, tamper: str = "") -> str:
    """A local `evaluate` metric folder; `tamper` is appended to the per-class IoU expression (e.g. "* 0.5")."""
    folder = root / name
    folder.mkdir(exist_ok=True)
    class_name = "".join(part.title() for part in name.split("_"))
    (folder / f"{name}.py").write_text(LOCAL_METRIC.format(name=class_name, tamper=tamper))
    return str(folder)
