"""The README's first command: the offline quickstart runs end to end."""

from transformers import AutoModelForSemanticSegmentation

from clip_rc.quickstart import main


def test_quickstart_trains_segments_and_reloads(tmp_path):
    results = main(["--output_dir", str(tmp_path / "run"), "--steps", "40"])
    assert results["pixel_accuracy"] > 0.8
    assert (tmp_path / "run" / "model.safetensors").exists()
    model = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "run")
    assert model.config.class_names == ["red square", "green square", "blue square"]
