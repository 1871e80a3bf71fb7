"""Bad configuration values, class names and prompt templates give errors naming the field, the value or the
template (issue 13, items 4, 10 and 11), at the one place that validates them."""

import json
import re

import pytest

from clip_rc import CLIPRCConfig
from clip_rc.configuration_clip_rc import check_class_names, check_templates

from .conftest import TINY_TEXT, TINY_VISION, tiny_config


# ---- templates ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template, message",
    [
        ("a photo", "the template 'a photo' has 0 '{}' slots"),
        ("a {} and {}", "the template 'a {} and {}' has 2 '{}' slots"),
        ("a {} of {kind}", "the template 'a {} of {kind}' has replacement field(s) {kind}"),
        ("a {0}", "the template 'a {0}' has replacement field(s) {0}"),
        ("a {!r}", "the template 'a {!r}' has replacement field(s) {!r}"),
        ("a { photo", "the template 'a { photo' is not a valid format string"),
    ],
)
def test_bad_templates_are_refused_naming_the_template(template, message):
    with pytest.raises(ValueError, match="^" + re.escape("`templates`: " + message)):
        check_templates(template)
    with pytest.raises(ValueError, match="`prompt_templates`: the template"):
        tiny_config(prompt_templates=["a photo of a {}", template])


def test_good_templates_pass_and_literal_braces_are_allowed():
    assert check_templates("a photo of a {}") == ("a photo of a {}",)
    assert check_templates(["{{x}} a {}", "a {}."]) == ("{{x}} a {}", "a {}.")
    assert "{{x}} a {}".format("cat") == "{x} a cat"
    with pytest.raises(ValueError, match="at least one prompt template"):
        check_templates([])
    with pytest.raises(ValueError, match="the template 3 is of type int"):
        check_templates(["a {}", 3])
    # A single string is one template, not a list of characters.
    assert tiny_config(prompt_templates="a {} in the scene").prompt_templates == ["a {} in the scene"]


# ---- class names --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "id2label, message",
    [
        ({}, "`id2label` must name at least one class"),
        ({0: "cat", 1: "cat", 2: "dog"}, r"`id2label` must not repeat a class name; repeated: \['cat'\]"),
        ({0: "cat", 1: "", 2: "dog"}, r"`id2label`: the class\(es\) at position\(s\) \[1\] have an empty name"),
        ({0: "cat", 1: "  ", 2: "dog"}, r"position\(s\) \[1\] have an empty name"),
        ({0: "cat", 2: "dog"}, r"`id2label` must be keyed 0 .. num_labels - 1, got keys \[0, 2\]"),
    ],
)
def test_bad_class_lists_are_refused(id2label, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(id2label=id2label, seen_class_ids=None)


def test_no_classes_through_num_labels_is_refused_and_the_helper_names_its_field():
    with pytest.raises(ValueError, match="`id2label` must name at least one class"):
        CLIPRCConfig(num_labels=0)
    with pytest.raises(ValueError, match=r"`candidate_labels` must not repeat a class name; repeated: \['a'\]"):
        check_class_names(["a", "b", "a"], field="candidate_labels")
    with pytest.raises(ValueError, match="must be a list of class names"):
        check_class_names("cat,dog")
    assert check_class_names(["cat", "dog"]) == ("cat", "dog")


# ---- config values ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"vision_config": {**TINY_VISION, "num_attention_heads": 0}},
         "`vision_config.num_attention_heads` must be a positive integer, got 0"),
        ({"vision_config": {**TINY_VISION, "patch_size": 0}}, "`vision_config.patch_size` must be a positive integer"),
        ({"text_config": {**TINY_TEXT, "num_attention_heads": 0}},
         "`text_config.num_attention_heads` must be a positive integer, got 0"),
        ({"decoder_hidden_size": 0}, "`decoder_hidden_size` must be at least 1, got 0"),
        ({"decoder_num_layers": 0}, "`decoder_num_layers` must be at least 1, got 0"),
        ({"decoder_num_layers": -1}, "`decoder_num_layers` must be at least 1, got -1"),
        ({"decoder_num_attention_heads": 0}, "`decoder_num_attention_heads` must be at least 1, got 0"),
        ({"crop_size": "sixty-four"}, "`crop_size` must be of type int, got 'sixty-four'"),
        ({"crop_size": 64.5}, "`crop_size` must be of type int, got 64.5"),
        ({"num_prompt_tokens": True}, "`num_prompt_tokens` must be of type int, got True"),
        ({"train_region_tokens": "yes"}, "`train_region_tokens` must be of type bool, got 'yes'"),
        ({"seen_class_ids": [0, "1"]}, r"`seen_class_ids` must be of type list\[int\] \| None, got \[0, '1'\]"),
        ({"prompt_dropout": 1.5}, r"`prompt_dropout` must lie in \[0, 1\], got 1.5"),
        ({"mask_loss_weight": float("nan")}, "`mask_loss_weight` must be a finite number, got nan"),
        ({"dice_loss_weight": -1.0}, "`dice_loss_weight` must be at least 0.0, got -1.0"),
        ({"ignore_index": 1}, r"`ignore_index` \(1\) must not be a class id"),
    ],
)  # fmt: skip
def test_bad_config_values_name_the_field_and_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_a_bad_value_in_config_json_names_the_field(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    values = json.loads((tmp_path / "config.json").read_text())
    values["crop_size"] = "sixty-four"
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match="`crop_size` must be of type int, got 'sixty-four'"):
        CLIPRCConfig.from_pretrained(tmp_path)


def test_valid_values_keep_their_meaning():
    # Integers are valid floats (a JSON `100` loss weight), NumPy integers valid ids; no recovery layer is a valid
    # architecture (the recovery branch is then linear only); presets and defaults are unchanged.
    import numpy as np

    config = tiny_config(mask_loss_weight=100, seen_class_ids=[np.int64(0), 1], recovery_num_layers=0)
    assert config.mask_loss_weight == 100 and config.seen_class_ids == [0, 1]
    assert type(config.seen_class_ids[0]) is int
    assert CLIPRCConfig().num_labels == 20 and CLIPRCConfig().prompt_templates == ["a photo of a {}"]
    coco = CLIPRCConfig.from_preset("coco-stuff-inductive")
    assert coco.num_labels == 171 and len(coco.prompt_templates) == 15
