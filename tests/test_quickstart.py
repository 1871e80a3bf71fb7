"""The README's first command: the offline quickstart runs end to end."""

import logging
import re

from transformers import AutoModelForSemanticSegmentation

from clip_rc.toy.quickstart import main


def test_quickstart_trains_segments_and_reloads(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="clip_rc.toy.quickstart"):
        # Exit code 0: the model reloaded from the folder segments exactly as the trained one.
        assert main(["--output_dir", str(tmp_path / "run"), "--steps", "40"]) == 0
    accuracy = re.search(r"pixel accuracy on 8 new \S+ images .*: ([0-9.]+)", caplog.text)
    assert accuracy is not None, caplog.text
    assert float(accuracy.group(1)) > 0.8
    assert (tmp_path / "run" / "model.safetensors").exists()
    assert (tmp_path / "run" / "preprocessor_config.json").exists()
    model = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "run")
    assert model.config.class_names == ["red square", "green square", "blue square"]
