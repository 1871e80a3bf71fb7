"""Your own data (README "Your own data"): the worked example's commands run as written on a tiny parquet repository
with an `id2label.json` (5 classes, 2 unseen) made here, with a tiny CLIP; and the class arguments' precedence and
errors.

In-process runs use one torch thread (see tests/test_training.py).
"""

import json
import re
import shlex
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from PIL import Image

from clip_rc import CLIPRCConfig, CLIPRCForSemanticSegmentation
from clip_rc.commands import evaluate as evaluation
from clip_rc.commands import predict
from clip_rc.commands import train as training
from clip_rc.commands.train import DataArguments, ModelArguments, training_class_list
from clip_rc.data import dataset_class_names
from clip_rc.data import loading as clip_rc_data

from .colour_block_data import class_colour
from .random_clip import save_random_clip


README = Path(__file__).resolve().parents[1] / "README.md"
CLASS_NAMES = ["cat", "dog", "grass", "sky", "tree"]
UNSEEN = [3, 4]  # sky, tree
TINY = (
    "--crop_size", "64", "--config_overrides",
    "decoder_hidden_size=24,decoder_intermediate_size=48,decoder_num_attention_heads=4,num_prompt_tokens=3,"
    "region_grid_size=2,decoder_attention_dropout=0.0",
    "--max_steps", "3", "--per_device_train_batch_size", "2", "--logging_steps", "1", "--eval_steps", "0",
    "--checkpointing_steps", "0", "--warmup_steps", "0", "--learning_rate", "1e-4",
)  # fmt: skip


def reset_accelerate():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def striped_sample(rng: np.random.Generator, class_ids: list[int], size: int = 64) -> tuple[Image.Image, Image.Image]:
    """An image of vertical stripes, one class each in its colour (plus noise), and its label map (a 2-pixel ignored
    top border)."""
    label = np.empty((size, size), dtype=np.uint8)
    for class_id, columns in zip(class_ids, np.array_split(np.arange(size), len(class_ids))):
        label[:, columns] = class_id
    colours = np.array([class_colour(class_id) for class_id in range(256)], dtype=np.float32)
    image = np.clip(colours[label] + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
    label[:2] = 255
    return Image.fromarray(image), Image.fromarray(label, mode="L")


def write_repository(root: Path, id2label: dict | None, train_stripes: list[list[int]], validation_stripes) -> Path:
    """A dataset repository as the Hub holds them: parquet shards (`image`, `label`) and `id2label.json`."""
    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    for split, stripes in (("train", train_stripes), ("validation", validation_stripes)):
        images, labels = zip(*(striped_sample(rng, class_ids) for class_ids in stripes))
        shard = datasets.Dataset.from_dict({"image": list(images), "label": list(labels)}, features=features)
        shard.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    if id2label is not None:
        (root / "id2label.json").write_text(json.dumps(id2label), encoding="utf-8")
    return root


def readme_commands() -> list[list[str]]:
    """The commands of the README's "Your own data" example, as argument lists (line continuations joined)."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Your own data\n", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)[0]
    lines = [line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]
    return [shlex.split(line) for line in lines]


def localised(argv: list[str], places: dict[str, str]) -> list[str]:
    """`argv` with the README's names (and paths under them) replaced by local ones."""
    result = []
    for token in argv:
        for name, local in places.items():
            if token == name or token.startswith(name + "/"):
                token = local + token[len(name) :]
        result.append(token)
    return result


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The README's example run on tiny data: training (its loss inputs recorded), evaluation, prediction."""
    root = tmp_path_factory.mktemp("own_data")
    # Unseen classes cover most training pixels, so that training on them would dominate the targets.
    train_stripes = [[3, 0, 4, 1], [4, 2, 3, 0], [3, 4, 1, 3], [2, 4, 3, 4], [0, 3, 4, 2], [4, 1, 3, 4]]
    validation_stripes = [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 4, 1, 3]]
    repository = write_repository(root / "my_dataset", dict(enumerate(CLASS_NAMES)), train_stripes, validation_stripes)
    photo = root / "photo.jpg"
    striped_sample(np.random.default_rng(1), [0, 3, 1])[0].save(photo)
    places = {
        "openai/clip-vit-base-patch16": str(save_random_clip(root / "clip")), "my_dataset": str(repository),
        "runs/my-zero-shot": str(root / "runs" / "my-zero-shot"), "predictions": str(root / "predictions"),
        "photo.jpg": str(photo),
    }  # fmt: skip
    commands = [localised(command, places) for command in readme_commands()]
    assert [command[:2] for command in commands] == [["python", "train_accelerate.py"], ["python", "eval.py"],
                                                     ["clip-rc-predict", "--model"]]  # fmt: skip

    recorded = []
    compute_loss, loss = CLIPRCForSemanticSegmentation.compute_loss, CLIPRCForSemanticSegmentation._loss

    def recording_loss(self, logits, labels, class_ids, *args):
        recorded.append({"labels": labels.clone(), "class_ids": class_ids.tolist(), "channels": logits.shape[1]})
        return loss(self, logits, labels, class_ids, *args)

    def recording_compute_loss(self, logits, targets, *args):
        recorded[-1]["targets"] = targets.clone()
        return compute_loss(self, logits, targets, *args)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(CLIPRCForSemanticSegmentation, "_loss", recording_loss)
            patch.setattr(CLIPRCForSemanticSegmentation, "compute_loss", recording_compute_loss)
            assert training.main(commands[0][2:] + list(TINY)) == 0
        reset_accelerate()
        assert evaluation.main(commands[1][2:] + ["--no_progress"]) == 0
        records, failures = predict.predict(predict.parse_args(commands[2][1:]))
    finally:
        torch.set_num_threads(threads)
        reset_accelerate()
    return {
        "root": root, "repository": repository, "model_dir": Path(places["runs/my-zero-shot"]), "recorded": recorded,
        "metrics": json.loads((root / "runs" / "my-zero-shot" / "eval" / "metrics.json").read_text()),
        "predictions": (records, failures), "places": places,
    }  # fmt: skip


def test_training_ignores_unseen_pixels_and_gives_the_head_the_seen_classes(world):
    recorded = world["recorded"]
    assert len(recorded) == 3  # one forward per iteration (batch 2)
    unseen_pixels = 0
    for step in recorded:
        labels, targets = step["labels"], step["targets"]
        assert step["class_ids"] == [0, 1, 2] and step["channels"] == 3
        unseen = torch.isin(labels, torch.tensor(UNSEEN))
        seen = torch.isin(labels, torch.tensor([0, 1, 2]))
        assert bool((targets[unseen] == 255).all())  # no unseen pixel supervises any channel
        assert torch.equal(targets[seen], labels[seen])  # seen ids are the head's channels 0..2
        assert bool((targets[~unseen & ~seen] == 255).all())
        unseen_pixels += int(unseen.sum())
    labelled = sum(int((step["labels"] != 255).sum()) for step in recorded)
    assert unseen_pixels > labelled / 2  # the crops were mostly unseen classes, all ignored


def test_the_saved_config_holds_the_classes_and_the_split(world):
    config = json.loads((world["model_dir"] / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(CLASS_NAMES)}
    assert config["seen_class_ids"] == [0, 1, 2] and config["benchmark"] == "custom"
    assert config["prompt_templates"] == ["a photo of a {}"] and config["setting"] == "inductive"
    loaded = CLIPRCConfig.from_pretrained(world["model_dir"])
    assert loaded.unseen_class_ids == UNSEEN and loaded.trained_class_ids == [0, 1, 2]
    recipe = json.loads((world["model_dir"] / "training_args.json").read_text())
    assert recipe["resolved.class_names_source"] == str(world["repository"] / "id2label.json")
    assert recipe["data.unseen_classes"] == "sky,tree"


def test_eval_reports_seen_unseen_and_harmonic_iou_from_the_saved_config(world):
    metrics = world["metrics"]
    assert metrics["class_names"] == CLASS_NAMES and metrics["split"] == "validation" and metrics["num_images"] == 3
    assert metrics["seen_class_ids"] == [0, 1, 2] and metrics["unseen_class_ids"] == UNSEEN
    iou = metrics["per_category_iou"]
    assert all(value is not None and 0.0 <= value <= 1.0 for value in iou)  # every class is in the validation split
    seen, unseen = np.mean(iou[:3]), np.mean(iou[3:])
    assert metrics["mean_iou_seen"] == pytest.approx(seen) and metrics["mean_iou_unseen"] == pytest.approx(unseen)
    expected_harmonic = 0.0 if seen + unseen == 0 else 2 * seen * unseen / (seen + unseen)
    assert metrics["harmonic_iou"] == pytest.approx(expected_harmonic)


def test_eval_class_arguments_override_the_saved_classes(world, tmp_path):
    base = ["--model", str(world["model_dir"]), "--dataset", str(world["repository"]), "--no_progress"]
    # Another split of the saved classes, by name: still the model's own (calibrated) classes.
    assert evaluation.main(base + ["--output_dir", str(tmp_path / "split"), "--unseen_classes", "grass,tree"]) == 0
    record = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert record["class_names"] == CLASS_NAMES and record["unseen_class_ids"] == [2, 4]
    assert record["class_names_source"] == str(world["repository"] / "id2label.json")
    # Other names before the dataset's id2label.json, encoded at run time: every class seen unless told.
    renamed = ["kitten", "puppy", "lawn", "heaven", "oak"]
    assert evaluation.main(base + ["--output_dir", str(tmp_path / "renamed"), "--class_names", ",".join(renamed)]) == 0
    record = json.loads((tmp_path / "renamed" / "metrics.json").read_text())
    assert record["class_names"] == renamed and record["unseen_class_ids"] == []
    with pytest.raises(SystemExit) as raised:
        evaluation.main(base + ["--class_names", "a,b", "--class_names_from", "voc"])
    assert raised.value.code == 2
    assert evaluation.main(base + ["--output_dir", str(tmp_path / "bad"), "--unseen_classes", "sly"]) == 1
    assert not (tmp_path / "bad" / "metrics.json").exists()


def test_predict_names_the_saved_classes(world):
    records, failures = world["predictions"]
    assert failures == [] and len(records) == 1
    assert records[0]["classes"] and set(records[0]["classes"]) <= set(CLASS_NAMES)
    label_map = np.asarray(Image.open(records[0]["label_map"]))
    assert label_map.shape == (64, 64) and int(label_map.max()) < len(CLASS_NAMES)


def test_the_transductive_stage_keeps_the_classes_and_split(world, tmp_path):
    """The README's transductive stage: a model with its own classes keeps them; the preset sets the setting."""
    try:
        torch.set_num_threads(1)
        training.main([
            "--preset", "voc-transductive", "--model_name_or_path", str(world["model_dir"]), "--dataset",
            str(world["repository"]), "--output_dir", str(tmp_path / "transductive"), "--no_final_evaluation",
            *TINY[4:],
        ])  # fmt: skip
    finally:
        reset_accelerate()
    config = CLIPRCConfig.from_pretrained(tmp_path / "transductive")
    assert config.setting == "transductive" and config.seen_score_bias == 0.0
    assert config.class_names == CLASS_NAMES and config.unseen_class_ids == UNSEEN and config.benchmark == "custom"


# ---- where the classes come from --------------------------------------------------------------------------------


def test_class_list_precedence(tmp_path):
    repository = tmp_path / "repo"
    repository.mkdir()
    (repository / "id2label.json").write_text(json.dumps({"1": "dog", "0": "cat", "2": "sky"}))
    from_clip = ModelArguments(preset="voc-inductive")
    # The dataset's id2label.json (keys in any order) before the preset's benchmark; no split unless given.
    classes = training_class_list(from_clip, DataArguments(dataset=str(repository)))
    assert classes.names == ("cat", "dog", "sky") and classes.unseen_class_ids == () and classes.benchmark is None
    # --class_names_file before id2label.json; --unseen_classes by id.
    names_file = tmp_path / "classes.txt"
    names_file.write_text("road\ntree\n wall \n\n", encoding="utf-8")
    classes = training_class_list(
        from_clip, DataArguments(dataset=str(repository), class_names_file=str(names_file), unseen_classes="1")
    )
    assert classes.names == ("road", "tree", "wall") and classes.unseen_class_ids == (1,)
    assert classes.source == f"--class_names_file {names_file}"
    classes = training_class_list(from_clip, DataArguments(dataset=str(repository), class_names="a, b"))
    assert classes.names == ("a", "b") and classes.benchmark_name == "custom"
    # Without any: the preset's benchmark with its split; --benchmark before it.
    classes = training_class_list(from_clip, DataArguments(dataset=str(tmp_path)))
    assert classes.benchmark == "voc" and classes.unseen_class_ids == (15, 16, 17, 18, 19)
    classes = training_class_list(from_clip, DataArguments(dataset=str(tmp_path), benchmark="ade20k-150"))
    assert classes.benchmark_name == "ade20k-150" and len(classes.names) == 150 and classes.unseen_class_ids == ()
    # A loaded model: its own classes and split, unless the data names others.
    config = CLIPRCConfig(id2label={0: "cat", 1: "dog", 2: "sky"}, seen_class_ids=[0, 2])
    classes = training_class_list(ModelArguments(), DataArguments(dataset=str(repository)), config)
    assert classes.unseen_class_ids == (1,)
    classes = training_class_list(ModelArguments(), DataArguments(dataset=str(tmp_path)), config)
    assert classes.names == ("cat", "dog", "sky") and classes.source == "the loaded model"


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"class_names": "cat,dog", "unseen_classes": "dgo"}, r"'dgo' is not one of the 2 class names\. .*'dog'"),
        ({"class_names": "cat,dog", "unseen_classes": "7"}, r"class id 7 is outside the 2 classes"),
        ({"class_names": "cat,dog", "unseen_classes": "cat,dog"}, r"names all 2 classes.*at least one must be seen"),
        ({"class_names": "cat,dog", "unseen_classes": "dog,1"}, r"names a class more than once: \['dog'\]"),
        ({"class_names": "cat,,dog"}, r"--class_names.*position\(s\) \[1\] have an empty name"),
        ({"class_names": ""}, r"empty name"),
        ({"class_names": "cat,dog,cat"}, r"must not repeat a class name; repeated: \['cat'\]"),
        ({"class_names": "cat", "class_names_file": "x.txt"}, r"--class_names or with --class_names_file, not both"),
    ],
)
def test_class_argument_errors(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        training_class_list(ModelArguments(preset="voc-inductive"), DataArguments(dataset=str(tmp_path), **arguments))


def test_class_file_and_id2label_errors_name_the_file(tmp_path):
    names_file = tmp_path / "classes.txt"
    names_file.write_text("cat\n\ndog\n")
    with pytest.raises(ValueError, match=r"Line\(s\) \[2\] of the class names file .*classes\.txt are blank"):
        training_class_list(ModelArguments(preset="voc-inductive"),
                            DataArguments(dataset=str(tmp_path), class_names_file=str(names_file)))  # fmt: skip
    names_file.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"classes\.txt is not valid UTF-8"):
        training_class_list(ModelArguments(preset="voc-inductive"),
                            DataArguments(dataset=str(tmp_path), class_names_file=str(names_file)))  # fmt: skip
    for content, message in (
        ({"0": "cat", "2": "dog"}, r"id2label\.json must number its 2 classes 0 \.\. 1; ids \[1\] are missing"),
        ({"0": "cat", "one": "dog"}, r"id2label\.json: the key 'one' is not a label id"),
        (["cat", "dog"], r"id2label\.json must be a non-empty JSON object"),
        ({"0": "cat", "1": "cat"}, r"id2label\.json.*repeated: \['cat'\]"),
    ):
        (tmp_path / "id2label.json").write_text(json.dumps(content))
        with pytest.raises(ValueError, match=message):
            training_class_list(ModelArguments(preset="voc-inductive"), DataArguments(dataset=str(tmp_path)))


def test_the_hub_id2label_json_is_fetched_with_hf_hub_download(tmp_path, monkeypatch, caplog):
    """A Hub dataset repository's id2label.json, served here from a local folder standing in for the repository."""
    (tmp_path / "id2label.json").write_text(json.dumps({"0": "cat", "1": "sky"}))
    calls = []

    def local_hub_download(repo_id, filename, repo_type=None, cache_dir=None):
        calls.append((repo_id, filename, repo_type))
        if repo_id == "offline/data":
            raise LocalEntryNotFoundError("the Hub cannot be reached")
        path = tmp_path / filename
        if repo_id != "someone/my-data" or not path.is_file():
            raise EntryNotFoundError(f"{filename} is not in {repo_id}")
        return str(path)

    monkeypatch.setattr(clip_rc_data, "hf_hub_download", local_hub_download)
    names, source = dataset_class_names("someone/my-data")
    assert names == ("cat", "sky") and source == "id2label.json of the Hub dataset someone/my-data"
    assert calls == [("someone/my-data", "id2label.json", "dataset")]
    assert dataset_class_names("someone/no-classes") is None
    assert dataset_class_names("offline/data") is None and "Could not look for id2label.json" in caplog.text


def test_a_label_id_outside_the_class_list_is_an_error_naming_the_label(tmp_path):
    repository = write_repository(tmp_path / "repo", {"0": "cat", "1": "dog"}, [[0, 1, 2]] * 2, [[0, 1]])
    clip_dir = save_random_clip(tmp_path / "clip")
    try:
        torch.set_num_threads(1)
        with pytest.raises(ValueError, match=r"label \(in-memory dict\) holds values \[2\].*\(2 classes"):
            training.train(["--preset", "voc-inductive", "--clip_model_name_or_path", str(clip_dir), "--dataset",
                            str(repository), "--output_dir", str(tmp_path / "out"), *TINY])  # fmt: skip
    finally:
        reset_accelerate()


def test_transductive_training_needs_a_split_and_overrides_cannot_set_classes(tmp_path):
    clip_dir = save_random_clip(tmp_path / "clip")
    base = ["--clip_model_name_or_path", str(clip_dir), "--dataset", str(tmp_path), "--class_names", "cat,dog",
            "--output_dir", str(tmp_path / "out"), *TINY]  # fmt: skip
    try:
        message = r"transductive setting.*2 classes of --class_names have no zero-shot split: pass --unseen_classes"
        with pytest.raises(ValueError, match=message):
            training.train(["--preset", "voc-transductive", *base])
        reset_accelerate()
        with pytest.raises(ValueError, match=r"cannot set \['seen_class_ids'\].*--unseen_classes"):
            training.train(["--preset", "voc-inductive", *base, "--config_overrides", "seen_class_ids=[0]"])
    finally:
        reset_accelerate()
