import dataclasses

import pytest

from clip_rc.class_sets import BENCHMARKS, COCO_STUFF_TEMPLATES, VOC_TEMPLATES, Benchmark, get_benchmark


def test_benchmark_names_and_sizes():
    assert set(BENCHMARKS) == {"voc", "coco-stuff", "pascal-context-59", "pascal-context-60", "ade20k-150"}
    sizes = {name: benchmark.num_classes for name, benchmark in BENCHMARKS.items()}
    assert sizes == {"voc": 20, "coco-stuff": 171, "pascal-context-59": 59, "pascal-context-60": 60, "ade20k-150": 150}
    for name, benchmark in BENCHMARKS.items():
        assert benchmark.name == name
        assert len(benchmark.palette) == benchmark.num_classes
        assert all(len(colour) == 3 and all(0 <= c <= 255 for c in colour) for colour in benchmark.palette)
        assert benchmark.ignore_index == 255


def test_voc_split_and_templates():
    voc = get_benchmark("voc")
    assert voc.class_names[0] == "aeroplane" and voc.class_names[-1] == "tvmonitor"
    assert voc.class_names[10] == "diningtable" and voc.class_names[13] == "motorbike"
    assert voc.unseen_class_ids == (15, 16, 17, 18, 19)
    assert voc.unseen_class_names == ("pottedplant", "sheep", "sofa", "train", "tvmonitor")
    assert voc.seen_class_ids == tuple(range(15))
    assert voc.templates == VOC_TEMPLATES == ("a photo of a {}",)
    assert voc.prompts("cat") == ["a photo of a cat"]
    # mmsegmentation's VOC palette without background: class k has the PASCAL colour-map colour k + 1.
    assert voc.palette[0] == (128, 0, 0) and voc.palette[14] == (192, 128, 128) and voc.palette[19] == (0, 64, 128)


def test_coco_stuff_split_names_and_templates():
    coco = get_benchmark("coco-stuff")
    assert coco.unseen_class_ids == (19, 23, 28, 29, 36, 51, 76, 88, 94, 112, 133, 136, 137, 157, 160)
    assert coco.unseen_class_names == (
        "cow", "giraffe", "suitcase", "frisbee", "skateboard", "carrot", "scissors", "cardboard", "clouds",
        "grass", "playingfield", "river", "road", "tree", "wall-concrete",
    )  # fmt: skip
    assert len(coco.seen_class_ids) == 156
    assert coco.class_names[:3] == ("person", "bicycle", "car")
    assert coco.class_names[80] == "banner" and coco.class_names[-1] == "wood"
    assert "hair drier" in coco.class_names and "mirror-stuff" in coco.class_names
    assert len(COCO_STUFF_TEMPLATES) == 15
    assert COCO_STUFF_TEMPLATES[0] == "a photo of a {}." and COCO_STUFF_TEMPLATES[-1] == "This is one {} in the scene."
    assert coco.templates == COCO_STUFF_TEMPLATES
    assert coco.palette[0] == (0, 192, 64) and coco.palette[-1] == (64, 64, 0)


def test_pascal_context_benchmarks():
    context_59, context_60 = get_benchmark("pascal-context-59"), get_benchmark("pascal-context-60")
    assert context_60.class_names == ("background",) + context_59.class_names
    assert context_59.class_names[:3] == ("aeroplane", "bag", "bed") and context_59.class_names[-1] == "wood"
    assert context_60.palette[1:] == context_59.palette and context_60.palette[0] == (120, 120, 120)
    for benchmark in (context_59, context_60):
        assert benchmark.unseen_class_ids == ()
        assert benchmark.seen_class_ids == tuple(range(benchmark.num_classes))
        assert benchmark.templates == COCO_STUFF_TEMPLATES


def test_ade20k_150_names_palette_and_templates():
    """mmsegmentation's ADE20KDataset, in train-id order (stored label k + 1 is class k)."""
    ade = get_benchmark("ade20k-150")
    assert ade.class_names[:8] == ("wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed")
    assert ade.class_names[44] == "chest of drawers" and ade.class_names[89] == "television receiver"
    assert ade.class_names[-3:] == ("glass", "clock", "flag")
    assert all(name == name.strip() for name in ade.class_names)  # mmsegmentation's "bed " is "bed"
    assert ade.unseen_class_ids == () and ade.seen_class_ids == tuple(range(150))
    assert ade.templates == COCO_STUFF_TEMPLATES
    assert ade.palette[0] == (120, 120, 120) and ade.palette[7] == (204, 5, 255) and ade.palette[-1] == (92, 0, 255)
    # mmsegmentation gives PASCAL Context the first 60 colours of the ADE20K palette.
    assert ade.palette[:60] == get_benchmark("pascal-context-60").palette
    assert len(set(ade.palette)) == 149  # one colour is repeated (ids 6 and 48), as in mmsegmentation


def test_label_maps_are_consistent():
    voc = get_benchmark("voc")
    assert voc.id2label[19] == "tvmonitor" and voc.label2id["cat"] == 7
    assert get_benchmark(voc) is voc


def test_unknown_benchmark_lists_allowed_names():
    with pytest.raises(ValueError, match=r"'ade20k'.*'voc'.*'coco-stuff'.*'pascal-context-59'.*'pascal-context-60'"):
        get_benchmark("ade20k")


def test_benchmark_is_frozen_and_validated():
    voc = get_benchmark("voc")
    with pytest.raises(dataclasses.FrozenInstanceError):
        voc.name = "other"
    with pytest.raises(ValueError, match="palette"):
        Benchmark("bad", ("a", "b"), (), ("{}",), ((0, 0, 0),))
    with pytest.raises(ValueError, match="unseen"):
        Benchmark("bad", ("a", "b"), (2,), ("{}",), ((0, 0, 0), (1, 1, 1)))
    with pytest.raises(ValueError, match="slot"):
        Benchmark("bad", ("a", "b"), (), ("no slot",), ((0, 0, 0), (1, 1, 1)))
