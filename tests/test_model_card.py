"""The model card written with a trained folder: Hub metadata parsed back by huggingface_hub."""

from huggingface_hub import ModelCard

from clip_rc import CLIPRCConfig
from clip_rc.model_card import build_model_card


METRICS = {
    "mean_iou": 0.8,
    "mean_iou_seen": 0.9,
    "mean_iou_unseen": 0.7,
    "harmonic_iou": 0.7875,
    "overall_accuracy": 0.95,
}


def test_card_metadata_and_model_index(tmp_path):
    config = CLIPRCConfig.from_preset("voc-inductive")
    recipe = {
        "clip_model_name_or_path": "openai/clip-vit-base-patch16",
        "dataset": str(tmp_path),
        "preset": "voc-inductive",
    }
    card = build_model_card(config, recipe, METRICS, "table", repo_id="user/clip-rc-voc", eval_split="val")
    card.save(tmp_path / "README.md")

    loaded = ModelCard.load(tmp_path / "README.md")
    data = loaded.data
    assert data.base_model == "openai/clip-vit-base-patch16"
    assert data.datasets == ["voc"]  # a local dataset folder is named by its benchmark
    assert data.metrics == ["mean_iou"]
    assert data.license == "apache-2.0" and data.library_name == "transformers"
    assert data.pipeline_tag == "image-segmentation"
    results = {result.metric_type: result for result in data.eval_results}
    assert set(results) == {"mean_iou", "mean_iou_seen", "mean_iou_unseen", "harmonic_iou", "overall_accuracy"}
    assert results["mean_iou_unseen"].metric_value == 70.0 and results["mean_iou"].dataset_split == "val"
    assert all(result.task_type == "image-segmentation" for result in results.values())
    assert 'pipeline("image-segmentation", model="user/clip-rc-voc", trust_remote_code=True)' in loaded.text
    assert "| 95.00 | 80.00 | 90.00 | 70.00 | 78.75 |" in loaded.text


def test_card_without_evaluation_has_no_model_index(tmp_path):
    config = CLIPRCConfig.from_preset("coco-stuff-fully")
    recipe = {"model_name_or_path": str(tmp_path), "dataset": "user/coco-stuff"}
    card = build_model_card(config, recipe)
    data = ModelCard(str(card)).data
    assert data.eval_results is None and data.base_model is None  # a local starting folder is not a Hub id
    assert data.datasets == ["user/coco-stuff"]
    assert "Not evaluated." in card.text
