"""The converter refuses non-finite weights (naming the tensors), broken model folders (naming the file), never
replaces a folder holding other files, and reads TorchScript archives without running their code (issue 13, items
3, 11, 12 and the README's TorchScript section)."""

import os
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from clip_rc.commands.convert import (
    CheckpointConversionError,
    convert_original_checkpoint,
    load_openai_clip,
    main,
    read_torchscript_tensors,
)
from clip_rc.commands.flops import main_flops

from .conftest import tiny_config, tiny_model
from .test_convert import (
    TEXT_HEADS,
    VISION_HEADS,
    hub_to_openai_layout,
    random_reference_state_dict,
    save_torchscript,
    tiny_hub_clip,
    write_checkpoint,
)


def to_original(folder, tmp_path):
    return main(["--to-original", "--checkpoint", str(folder), "--output_dir", str(tmp_path / "ref.pth")])


# ---- non-finite weights -------------------------------------------------------------------------------------------


def test_a_reference_checkpoint_with_nan_is_refused_naming_the_tensors(tmp_path, capsys):
    state = random_reference_state_dict()
    state["backbone.prompt_embeddings"][0, 0, 0] = float("nan")
    state["decode_head.q_proj.weight"][1, 2] = float("inf")
    checkpoint = write_checkpoint(tmp_path / "diverged.pth", state)
    with pytest.raises(CheckpointConversionError, match="diverged.pth holds NaN or infinite values in 2 tensors"):
        convert_original_checkpoint(checkpoint, config=tiny_config())
    tiny_config().save_pretrained(tmp_path / "config")
    output = tmp_path / "out"
    argv = ["--checkpoint", str(checkpoint), "--config", str(tmp_path / "config"), "--output_dir", str(output)]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert "backbone.prompt_embeddings" in error and "decode_head.q_proj.weight" in error
    assert not output.exists() and not [path for path in tmp_path.iterdir() if path.name.startswith(".out")]

    with pytest.raises(CheckpointConversionError, match="the given class embeddings holds NaN"):
        convert_original_checkpoint(
            random_reference_state_dict(), config=tiny_config(), class_embeddings=torch.full((3, 24), float("nan"))
        )


def test_openai_weights_with_inf_are_refused():
    openai = hub_to_openai_layout(tiny_hub_clip())
    openai["visual.proj"] = openai["visual.proj"].clone()
    openai["visual.proj"][0, 0] = float("-inf")
    with pytest.raises(CheckpointConversionError, match=r"holds NaN or infinite values in 1 tensors: visual\.proj"):
        load_openai_clip(openai, vision_num_heads=VISION_HEADS, text_num_heads=TEXT_HEADS)


def test_a_model_folder_with_nan_is_not_converted_to_the_reference_layout(tmp_path, capsys):
    model = tiny_model()
    with torch.no_grad():
        model.decode_head.lateral_proj.bias[0] = float("nan")
    model.save_pretrained(tmp_path / "trained")
    assert to_original(tmp_path / "trained", tmp_path) == 1
    assert "decode_head.lateral_proj.bias" in capsys.readouterr().err
    assert not (tmp_path / "ref.pth").exists()


# ---- broken model folders and configs -----------------------------------------------------------------------------


def test_broken_model_folders_are_named(tmp_path, capsys):
    folder = tmp_path / "trained"
    tiny_model().save_pretrained(folder)
    weights = folder / "model.safetensors"
    complete = weights.read_bytes()

    # A tensor missing from the weights: not converted with a freshly initialised stand-in.
    tensors = load_file(str(weights))
    del tensors["decode_head.q_proj.weight"]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert to_original(folder, tmp_path) == 1
    assert "lack 1 tensors (decode_head.q_proj.weight)" in capsys.readouterr().err

    weights.write_bytes(complete[: len(complete) // 2])
    assert to_original(folder, tmp_path) == 1
    assert f"Weight file {weights} is truncated or corrupt" in capsys.readouterr().err

    weights.write_bytes(complete)
    (folder / "config.json").unlink()
    assert to_original(folder, tmp_path) == 1
    assert f"{folder} holds no config.json" in capsys.readouterr().err
    assert not (tmp_path / "ref.pth").exists()


def test_bad_config_files_are_named(tmp_path, capsys):
    checkpoint = str(write_checkpoint(tmp_path / "voc.pth"))
    (tmp_path / "empty").mkdir()
    output = str(tmp_path / "o")
    assert main(["--checkpoint", checkpoint, "--config", str(tmp_path / "empty"), "--output_dir", output]) == 1
    assert f"{tmp_path / 'empty'} holds no config.json" in capsys.readouterr().err

    bad = tmp_path / "bad.json"
    bad.write_text(tiny_config().to_json_string().replace('"crop_size": 64', '"crop_size": "sixty-four"'))
    assert main(["--checkpoint", checkpoint, "--config", str(bad), "--output_dir", output]) == 1
    assert f"{bad} is not a valid CLIP-RC configuration: `crop_size` must be of type int, got 'sixty-four'" in (
        capsys.readouterr().err
    )
    assert main_flops([str(tmp_path / "empty")]) == 1
    assert "holds no config.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_folder_holding_other_files_is_never_replaced(tmp_path, capsys):
    checkpoint = str(write_checkpoint(tmp_path / "voc.pth"))
    tiny_config().save_pretrained(tmp_path / "config")
    output = tmp_path / "models"
    output.mkdir()
    (output / "notes.md").write_text("my notes")
    argv = ["--checkpoint", checkpoint, "--config", str(tmp_path / "config"), "--output_dir", str(output)]
    assert main(argv) == 1
    assert "already holds files this run does not write (notes.md)" in capsys.readouterr().err
    assert sorted(path.name for path in output.iterdir()) == ["notes.md"]
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".models")]
    # A folder of an earlier conversion (the same files) is replaced.
    (output / "notes.md").unlink()
    assert main(argv) == 0 and main(argv) == 0
    assert (output / "config.json").is_file()


# ---- TorchScript archives, tensors only ----------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.register_buffer("scale", torch.arange(3.0).half())
        self.attn_mask = torch.ones(2, 2)  # a plain attribute: not in the state dict

    def forward(self, x):
        return self.linear(x) * self.attn_mask.sum()


def test_torchscript_tensors_equal_torch_jit_load_without_running_code(tmp_path):
    scripted = torch.jit.trace(nn.Sequential(_Block(), _Block()), torch.zeros(1, 2))
    path = tmp_path / "archive.pt"
    torch.jit.save(scripted, str(path))
    expected = torch.jit.load(str(path)).state_dict()
    found = read_torchscript_tensors(path)
    assert sorted(found) == sorted(expected) == ["0.linear.bias", "0.linear.weight", "0.scale", "1.linear.bias",
                                                 "1.linear.weight", "1.scale"]  # fmt: skip
    for name in expected:
        assert found[name].dtype == expected[name].dtype and torch.equal(found[name], expected[name]), name


def test_a_torchscript_archive_whose_pickle_runs_code_is_refused(tmp_path):
    good = save_torchscript(tmp_path / "ViT-B-16.pt", hub_to_openai_layout(tiny_hub_clip()))
    witness = tmp_path / "code-ran"

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {witness}",)

    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(evil, "w") as target:
        for entry in source.namelist():
            data = pickle.dumps(RunsCode(), protocol=2) if entry.endswith("/data.pkl") else source.read(entry)
            target.writestr(entry, data)
    with pytest.raises(CheckpointConversionError, match=r"evil.pt references (posix|os|nt)\.system"):
        load_openai_clip(evil, vision_num_heads=VISION_HEADS, text_num_heads=TEXT_HEADS)
    assert not witness.exists()
    # The trusted path (torch.jit.load) stays available for archives that need it.
    trusted = load_openai_clip(good, vision_num_heads=VISION_HEADS, text_num_heads=TEXT_HEADS, trust_torchscript=True)
    default = load_openai_clip(good, vision_num_heads=VISION_HEADS, text_num_heads=TEXT_HEADS)
    assert all(torch.equal(trusted.state_dict()[name], tensor) for name, tensor in default.state_dict().items())
