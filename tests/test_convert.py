"""Checkpoint conversion (reference <-> library, OpenAI CLIP), its command line, the parity of a converted model with an
independent implementation of the reference (tests/reference_oracle.py), and the parameter / FLOP report."""

import logging
import os
import zipfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForSemanticSegmentation, CLIPConfig, CLIPModel

from clip_rc import CLIPRCForSemanticSegmentation, CLIPRCImageProcessor, CLIPRCProcessor
from clip_rc.commands.convert import (
    CheckpointConversionError,
    convert_original_checkpoint,
    load_openai_clip,
    main,
    read_original_architecture,
    save_original_checkpoint,
    to_original_state_dict,
)
from clip_rc.commands.flops import flop_report, format_report, main_flops

from .conftest import TINY_TEXT, TINY_VISION, tiny_config, tiny_model, without_dropout
from .reference_oracle import (
    reference_forward,
    reference_losses,
    reference_targets,
    reference_text_embeddings,
)


# Sizes of the tiny reference checkpoints built below; they match conftest's tiny config.
D, VISION_FFN, VISION_LAYERS, VISION_HEADS, PATCH, CROP = 32, 64, 2, 4, 8, 64
P, GRID, E = 3, 2, 24
W, TEXT_FFN, TEXT_LAYERS, TEXT_HEADS, VOCAB, CONTEXT = 32, 64, 2, 4, 64, 16
H, DECODER_HEADS, DECODER_FFN, DECODER_LAYERS, RECOVERY_LAYERS = 24, 4, 48, 3, 1
R = GRID * GRID
NUM_POSITIONS = 1 + (CROP // PATCH) ** 2


# ---- a random checkpoint in the reference layout, written from SPEC §8 (independent of the converter) --------------


def _normal(generator, *shape, scale=None):
    scale = scale if scale is not None else (shape[-1] ** -0.5 if len(shape) > 1 else 0.1)
    return torch.randn(*shape, generator=generator) * scale


def _norm(sd, generator, name, width):
    sd[name + ".weight"] = 1 + 0.1 * torch.randn(width, generator=generator)
    sd[name + ".bias"] = 0.1 * torch.randn(width, generator=generator)


def _linear(sd, generator, name, out_features, in_features):
    sd[name + ".weight"] = _normal(generator, out_features, in_features)
    sd[name + ".bias"] = 0.1 * torch.randn(out_features, generator=generator)


def _resblocks(sd, generator, prefix, layers, width, ffn):
    for i in range(layers):
        block = f"{prefix}transformer.resblocks.{i}."
        sd[block + "attn.in_proj_weight"] = _normal(generator, 3 * width, width)
        sd[block + "attn.in_proj_bias"] = 0.1 * torch.randn(3 * width, generator=generator)
        _linear(sd, generator, block + "attn.out_proj", width, width)
        _norm(sd, generator, block + "ln_1", width)
        _linear(sd, generator, block + "mlp.c_fc", ffn, width)
        _linear(sd, generator, block + "mlp.c_proj", width, ffn)
        _norm(sd, generator, block + "ln_2", width)


def _decoder_layer(sd, generator, prefix, with_unused=True):
    for name in ("q", "k", "v", "proj"):
        _linear(sd, generator, f"{prefix}multihead_attn.{name}", H, H)
    _linear(sd, generator, prefix + "linear1", DECODER_FFN, H)
    _linear(sd, generator, prefix + "linear2", H, DECODER_FFN)
    _norm(sd, generator, prefix + "norm2", H)
    _norm(sd, generator, prefix + "norm3", H)
    if with_unused:
        sd[prefix + "self_attn.in_proj_weight"] = _normal(generator, 3 * H, H)
        sd[prefix + "self_attn.in_proj_bias"] = torch.zeros(3 * H)
        _linear(sd, generator, prefix + "self_attn.out_proj", H, H)
        _norm(sd, generator, prefix + "norm1", H)


def random_reference_state_dict(seed=0, with_unused=True) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sd = {}
    b = "backbone."
    sd[b + "class_embedding"] = _normal(generator, D, scale=0.5)
    sd[b + "positional_embedding"] = _normal(generator, NUM_POSITIONS, D, scale=0.5)
    sd[b + "region_level_bridge"] = _normal(generator, R, D, scale=0.5)
    sd[b + "proj"] = _normal(generator, D, E, scale=D**-0.5)
    sd[b + "prompt_embeddings"] = _normal(generator, 1, P, D, scale=0.5)
    sd[b + "deep_prompt_embeddings"] = _normal(generator, VISION_LAYERS - 1, P, D, scale=0.5)
    sd[b + "conv1.weight"] = _normal(generator, D, 3, PATCH, PATCH, scale=(3 * PATCH * PATCH) ** -0.5)
    _norm(sd, generator, b + "ln_pre", D)
    _resblocks(sd, generator, b, VISION_LAYERS, D, VISION_FFN)
    _norm(sd, generator, b + "ln_post", D)
    _linear(sd, generator, b + "prompt_proj", D, D)
    _norm(sd, generator, b + "prompt_norm", D)

    t = "text_encoder."
    sd[t + "positional_embedding"] = _normal(generator, CONTEXT, W, scale=0.1)
    sd[t + "text_projection"] = _normal(generator, W, E, scale=W**-0.5)
    sd[t + "token_embedding.weight"] = _normal(generator, VOCAB, W, scale=0.5)
    _resblocks(sd, generator, t, TEXT_LAYERS, W, TEXT_FFN)
    _norm(sd, generator, t + "ln_final", W)

    h = "decode_head."
    _linear(sd, generator, h + "q_proj", H, 2 * E)
    _linear(sd, generator, h + "lateral_proj", H, 3 * E)
    for stack in ("decoder_q", "decoder_v"):
        for i in range(DECODER_LAYERS):
            _decoder_layer(sd, generator, f"{h}{stack}.layers.{i}.", with_unused)
    rec = h + "recovery_decoder."
    for stack in ("decouple_q", "decouple_v"):
        for i in range(RECOVERY_LAYERS):
            _decoder_layer(sd, generator, f"{rec}{stack}.{i}.", with_unused)
    _linear(sd, generator, rec + "linear_q_in", H, H)
    _linear(sd, generator, rec + "linear_k_in", H, H)
    _linear(sd, generator, rec + "linear_q_out", 2 * E, H)
    _linear(sd, generator, rec + "linear_k_out", E, H)
    return sd


def mmcv_checkpoint(state_dict) -> dict:
    """mmcv's wrapper, with an optimizer state as a training run saves it."""
    return {
        "meta": {"mmcv_version": "1.5.0", "CLASSES": ("cat", "dog", "grass"), "iter": 40000, "epoch": 1},
        "state_dict": state_dict,
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
            "param_groups": [{"lr": 2e-5}],
        },
    }


def write_checkpoint(path, state_dict=None):
    torch.save(mmcv_checkpoint(state_dict if state_dict is not None else random_reference_state_dict()), path)
    return path


def prompt_ids(num_classes=3, seed=0):
    """Token ids as CLIP writes them: start token, words, end-of-text (the highest id), padding after."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((num_classes, 8), TINY_TEXT["pad_token_id"])
    for c in range(num_classes):
        length = 3 + c
        ids[c, 0] = TINY_TEXT["bos_token_id"]
        ids[c, 1 : 1 + length] = torch.randint(0, 60, (length,), generator=generator)
        ids[c, 1 + length] = TINY_TEXT["eos_token_id"]
    return ids


def tiny_tokenizer():
    """A word-level tokenizer with CLIP's special-token convention (start 62, end-of-text 63 = last id)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["a", "photo", "of", "cat", "dog", "grass"]
    vocab = {word: index for index, word in enumerate(["<unk>", *words])}
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), 62)})
    vocab.update({"<|startoftext|>": 62, "<|endoftext|>": 63})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 62), ("<|endoftext|>", 63)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
    )


# ---- layout -------------------------------------------------------------------------------------------------------


def test_round_trip_library_reference_library_is_bit_identical():
    model = tiny_model(seed=3)
    original = to_original_state_dict(model)
    converted = convert_original_checkpoint(
        mmcv_checkpoint(original), config=model.config, class_embeddings=model.class_embeddings
    )
    expected, found = model.state_dict(), converted.state_dict()
    assert expected.keys() == found.keys()
    for name in expected:
        assert torch.equal(expected[name], found[name]), name


def test_library_to_reference_layout_has_the_reference_keys_and_shapes():
    model = convert_original_checkpoint(random_reference_state_dict(), config=tiny_config())
    reference = random_reference_state_dict()
    original = to_original_state_dict(model)
    assert original.keys() == reference.keys()
    for name, tensor in reference.items():
        assert original[name].shape == tensor.shape, name
        if "self_attn" in name or "norm1" in name:
            assert not original[name].any(), f"{name} (unused by the reference) should be zero-filled"
        else:
            assert torch.equal(original[name], tensor), name
    assert not any("self_attn" in name for name in to_original_state_dict(model, include_unused_weights=False))


def test_reference_tensors_land_where_the_spec_says(tmp_path):
    sd = random_reference_state_dict(seed=1)
    path = write_checkpoint(tmp_path / "voc_zero.pth", sd)
    state = convert_original_checkpoint(path, config=tiny_config()).state_dict()
    fused = sd["backbone.transformer.resblocks.1.attn.in_proj_weight"]
    layer = "clip_rc.vision_model.encoder.layers.1.self_attn."
    assert torch.equal(state[layer + "q_proj.weight"], fused[:D])
    assert torch.equal(state[layer + "k_proj.weight"], fused[D : 2 * D])
    assert torch.equal(state[layer + "v_proj.weight"], fused[2 * D :])
    assert torch.equal(
        state["clip_rc.text_model.encoder.layers.0.self_attn.v_proj.bias"],
        sd["text_encoder.transformer.resblocks.0.attn.in_proj_bias"][2 * W :],
    )
    pairs = {
        "clip_rc.vision_model.embeddings.position_embedding.weight": sd["backbone.positional_embedding"],
        "clip_rc.vision_model.embeddings.class_embedding": sd["backbone.class_embedding"],
        "clip_rc.vision_model.embeddings.patch_embedding.weight": sd["backbone.conv1.weight"],
        "clip_rc.vision_model.region_tokens": sd["backbone.region_level_bridge"],
        "clip_rc.vision_model.deep_prompt_embeddings": sd["backbone.deep_prompt_embeddings"],
        "clip_rc.vision_model.pre_layrnorm.weight": sd["backbone.ln_pre.weight"],
        "clip_rc.vision_model.post_layernorm.bias": sd["backbone.ln_post.bias"],
        "clip_rc.vision_model.prompt_norm.weight": sd["backbone.prompt_norm.weight"],
        "clip_rc.vision_model.encoder.layers.0.mlp.fc1.weight": sd["backbone.transformer.resblocks.0.mlp.c_fc.weight"],
        "clip_rc.vision_model.encoder.layers.0.layer_norm2.bias": sd["backbone.transformer.resblocks.0.ln_2.bias"],
        "clip_rc.visual_projection.weight": sd["backbone.proj"].T,
        "clip_rc.text_projection.weight": sd["text_encoder.text_projection"].T,
        "clip_rc.text_model.embeddings.position_embedding.weight": sd["text_encoder.positional_embedding"],
        "clip_rc.text_model.final_layer_norm.weight": sd["text_encoder.ln_final.weight"],
        "decode_head.decoder_v.2.linear2.weight": sd["decode_head.decoder_v.layers.2.linear2.weight"],
        "decode_head.decoder_q.1.multihead_attn.k.bias": sd["decode_head.decoder_q.layers.1.multihead_attn.k.bias"],
        "decode_head.recovery.pixel_in.weight": sd["decode_head.recovery_decoder.linear_k_in.weight"],
        "decode_head.recovery.query_out.weight": sd["decode_head.recovery_decoder.linear_q_out.weight"],
        "decode_head.recovery.pixel_layers.0.norm3.weight": sd[
            "decode_head.recovery_decoder.decouple_v.0.norm3.weight"
        ],
    }
    for name, expected in pairs.items():
        assert torch.equal(state[name], expected), name
    assert not state["class_embeddings"].any()


def test_unused_reference_weights_are_dropped_and_counted(caplog):
    with caplog.at_level(logging.INFO, logger="clip_rc.commands.convert"):
        convert_original_checkpoint(random_reference_state_dict(), config=tiny_config())
    # 6 tensors in each of 3 + 3 decoder layers and 1 + 1 recovery layers.
    assert "Dropped 48 tensors" in caplog.text
    assert "class embeddings" in caplog.text  # no tokenizer: said so
    # A checkpoint without them converts as well.
    convert_original_checkpoint(random_reference_state_dict(with_unused=False), config=tiny_config())


def test_architecture_is_read_from_the_tensors():
    architecture = read_original_architecture(random_reference_state_dict())
    assert architecture["vision"] == {
        "hidden_size": D,
        "num_hidden_layers": VISION_LAYERS,
        "intermediate_size": VISION_FFN,
        "patch_size": PATCH,
        "num_channels": 3,
    }
    assert architecture["text"] == {
        "hidden_size": W,
        "num_hidden_layers": TEXT_LAYERS,
        "intermediate_size": TEXT_FFN,
        "vocab_size": VOCAB,
        "max_position_embeddings": CONTEXT,
    }
    assert (architecture["crop_size"], architecture["num_prompt_tokens"], architecture["region_grid_size"]) == (
        CROP,
        P,
        GRID,
    )
    assert (
        architecture["projection_dim"],
        architecture["decoder_hidden_size"],
        architecture["decoder_intermediate_size"],
    ) == (E, H, DECODER_FFN)
    assert (architecture["decoder_num_layers"], architecture["recovery_num_layers"]) == (
        DECODER_LAYERS,
        RECOVERY_LAYERS,
    )


def test_preset_gives_classes_and_split_and_tensors_give_sizes():
    model = convert_original_checkpoint(
        random_reference_state_dict(),
        preset="voc-inductive",
        vision_num_heads=4,
        text_num_heads=4,
        decoder_num_heads=4,
    )
    config = model.config
    assert (
        config.num_labels == 20 and config.id2label[15] == "pottedplant" and config.seen_class_ids == list(range(15))
    )
    assert config.crop_size == CROP and config.num_prompt_tokens == P and config.region_grid_size == GRID
    assert config.vision_config.hidden_size == D and config.vision_config.num_attention_heads == 4
    assert config.text_config.eos_token_id == VOCAB - 1  # CLIP's end-of-text = last id
    assert config.sliding_window_stride <= config.crop_size
    # Widths that are neither the preset's nor a multiple of 64 need explicit head counts.
    with pytest.raises(CheckpointConversionError, match="vision-heads"):
        convert_original_checkpoint(random_reference_state_dict(), preset="voc-inductive")


# ---- bad inputs ---------------------------------------------------------------------------------------------------


class _NeedsCode:
    def __reduce__(self):
        return (os.getpid, ())


def test_bad_files_fail_with_clear_errors(tmp_path):
    good = write_checkpoint(tmp_path / "good.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointConversionError, match="truncated.pth.*truncated"):
        convert_original_checkpoint(truncated, config=tiny_config())

    unsafe = tmp_path / "unsafe.pth"
    torch.save({"state_dict": random_reference_state_dict(), "meta": {"hook": _NeedsCode()}}, unsafe)
    with pytest.raises(CheckpointConversionError, match="unsafe.pth.*arbitrary code.*getpid"):
        convert_original_checkpoint(unsafe, config=tiny_config())

    with pytest.raises(FileNotFoundError, match="missing.pth"):
        convert_original_checkpoint(tmp_path / "missing.pth", config=tiny_config())

    not_a_checkpoint = tmp_path / "notes.pth"
    not_a_checkpoint.write_text("hello")
    with pytest.raises(CheckpointConversionError, match="notes.pth"):
        convert_original_checkpoint(not_a_checkpoint, config=tiny_config())


def test_shape_mismatches_extra_and_missing_keys_are_listed(tmp_path):
    sd = random_reference_state_dict()
    sd["backbone.proj"] = torch.zeros(D, E + 1)
    sd["decode_head.conv_seg.weight"] = torch.zeros(3, H, 1, 1)
    del sd["decode_head.recovery_decoder.linear_k_out.bias"]
    path = write_checkpoint(tmp_path / "broken.pth", sd)
    with pytest.raises(CheckpointConversionError) as error:
        convert_original_checkpoint(path, config=tiny_config())
    message = str(error.value)
    assert "broken.pth" in message
    assert f"backbone.proj: expected [{D}, {E}], found [{D}, {E + 1}]" in message
    assert "unexpected tensors (1): decode_head.conv_seg.weight" in message
    assert "missing tensors (1): decode_head.recovery_decoder.linear_k_out.bias" in message


def test_a_config_that_does_not_fit_the_checkpoint_is_refused():
    with pytest.raises(
        CheckpointConversionError, match=r"backbone.prompt_embeddings: expected \[1, 5, 32\], found \[1, 3, 32\]"
    ):
        convert_original_checkpoint(random_reference_state_dict(), config=tiny_config(num_prompt_tokens=5))


def test_torchscript_archive_is_pointed_to_the_openai_loader(tmp_path):
    path = save_torchscript(tmp_path / "ViT-B-16.pt", {"visual.proj": torch.zeros(2, 2)})
    with pytest.raises(CheckpointConversionError, match="TorchScript.*load_openai_clip"):
        convert_original_checkpoint(path, config=tiny_config())


# ---- parity with the independent reference implementation --------------------------------------------------------


def _labels(seed=0):
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 3, (2, 4, 4), generator=generator)
    coarse[0, 0, 0] = UNSEEN[0]  # an unseen pixel block in image 0
    coarse[1][coarse[1] == UNSEEN[0]] = SEEN[1]  # image 1: seen classes only
    labels = coarse.repeat_interleave(16, dim=1).repeat_interleave(16, dim=2)
    labels[:, :5, :7] = 255
    return labels


# A split whose seen ids are not 0..S-1, so that the inductive re-indexing matters.
SEEN, UNSEEN, ALL_CLASSES = [0, 2], [1], [0, 1, 2]


def _oracle_text(sd):
    return reference_text_embeddings(sd, prompt_ids(), TEXT_HEADS)


@pytest.mark.parametrize("setting", ["inductive", "transductive"])
def test_parity_with_the_reference_oracle(setting):
    sd = random_reference_state_dict(seed=7)
    model = convert_original_checkpoint(
        mmcv_checkpoint(sd), config=without_dropout(setting=setting, seen_class_ids=SEEN)
    )
    torch.manual_seed(0)
    pixel_values = torch.randn(2, 3, CROP, CROP)
    labels = _labels()

    # Text: the converted text tower equals the reference's (EOT = argmax token).
    text = _oracle_text(sd)
    torch.testing.assert_close(model.clip_rc.encode_class_prompts(prompt_ids()), text, atol=1e-5, rtol=0)

    # Inference: logits upsampled to the crop = pred_masks; calibrated scores of the processor's post-processing.
    model.eval()
    model.set_class_embeddings(text)
    image_processor = CLIPRCImageProcessor.from_model_config(model.config)
    seen_weight = 0.1 if setting == "inductive" else 0.0
    with torch.no_grad():
        oracle = reference_forward(
            sd, pixel_values, text, P, GRID, VISION_HEADS, DECODER_HEADS, seen_idx=SEEN, seen_weight=seen_weight
        )
        outputs = model(pixel_values=pixel_values)
        processed = image_processor.post_process_semantic_segmentation(outputs, return_segmentation_scores=True)
    logits = outputs.logits
    scores = torch.stack([result.segmentation_scores for result in processed])
    assert scores.shape == oracle["scores"].shape == (2, len(ALL_CLASSES), CROP, CROP)
    pred_masks = F.interpolate(logits, size=(CROP, CROP), mode="bilinear", align_corners=False)
    message = "converted model disagrees with the reference oracle (model, not converter: see modeling_clip_rc.py)"
    assert (pred_masks - oracle["pred_masks"]).abs().max() <= 1e-4, message
    assert (scores - oracle["scores"]).abs().max() <= 1e-4, message

    # Training: the three losses, dropout off.
    _assert_training_matches_the_oracle(model, sd, pixel_values, labels, text, setting, message)


def _assert_training_matches_the_oracle(model, sd, pixel_values, labels, text, setting, message):
    """The training forward's logits and its four losses equal the reference oracle's, dropout off."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if hasattr(module, "dropout") and isinstance(module.dropout, float):
            module.dropout = 0.0
    output = model(pixel_values, labels=labels, text_embeds=text)
    seen, all_classes = SEEN, ALL_CLASSES
    head_classes = seen if setting == "inductive" else all_classes
    oracle = reference_forward(
        sd, pixel_values, text[head_classes], P, GRID, VISION_HEADS, DECODER_HEADS, training=True
    )
    targets = reference_targets(labels, seen, all_classes, setting, pred_masks=oracle["pred_masks"])
    if setting == "inductive":
        assert (targets == 255).sum() > (labels == 255).sum()  # unseen pixels were ignored
        assert (targets[labels == SEEN[1]] == 1).all()  # seen ids re-indexed 0..S-1
    else:
        assert set(torch.unique(targets[labels == UNSEEN[0]]).tolist()) <= set(UNSEEN)  # pseudo labels: unseen
    oracle_losses = reference_losses(oracle, targets, mask_weight=100.0, dice_weight=1.0, recovery_weight=2.0)
    pairs = {
        "loss_focal": "loss_mask",
        "loss_dice": "loss_dice",
        "loss_recovery_query": "recovery_loss_q",
        "loss_recovery_pixel": "recovery_loss_k",
    }
    upsampled = F.interpolate(output.logits, size=(CROP, CROP), mode="bilinear", align_corners=False)
    assert (upsampled - oracle["pred_masks"]).abs().max() <= 1e-4, message
    for ours, theirs in pairs.items():
        difference = (output.loss_dict[ours] - oracle_losses[theirs]).abs().item()
        assert difference <= 1e-4, f"{ours} vs reference {theirs}: |diff| = {difference:.3g}; {message}"
    assert all(value.item() > 0 for value in oracle_losses.values())


# ---- OpenAI CLIP weights ------------------------------------------------------------------------------------------


class _Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_torchscript(path, state_dict):
    """A TorchScript archive whose state dict has the given names, as OpenAI's released .pt files."""
    root = _Holder()
    for name, tensor in state_dict.items():
        *path_parts, leaf = name.split(".")
        module = root
        for part in path_parts:
            if not hasattr(module, part):
                module.add_module(part, _Holder())
            module = getattr(module, part)
        module.register_parameter(leaf, nn.Parameter(tensor.clone(), requires_grad=False))
    torch.jit.save(torch.jit.script(root), str(path))
    return path


def tiny_hub_clip(seed=0) -> CLIPModel:
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=dict(TINY_TEXT), vision_config=dict(TINY_VISION), projection_dim=E)
    model = CLIPModel(config).eval()
    with torch.no_grad():  # fp16-representable values, as OpenAI ships them
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())
    return model


def hub_to_openai_layout(model: CLIPModel) -> dict[str, torch.Tensor]:
    """OpenAI's names for a Hub CLIP, written out by hand (as OpenAI's clip/model.py names them)."""
    hub = model.state_dict()
    sd = {"logit_scale": hub["logit_scale"]}
    for tower, prefix, layers in (("vision_model", "visual.", VISION_LAYERS), ("text_model", "", TEXT_LAYERS)):
        for i in range(layers):
            source, target = f"{tower}.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
            for kind in ("weight", "bias"):
                sd[target + f"attn.in_proj_{kind}"] = torch.cat(
                    [hub[source + f"self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
                )
                sd[target + f"attn.out_proj.{kind}"] = hub[source + f"self_attn.out_proj.{kind}"]
                sd[target + f"ln_1.{kind}"] = hub[source + f"layer_norm1.{kind}"]
                sd[target + f"mlp.c_fc.{kind}"] = hub[source + f"mlp.fc1.{kind}"]
                sd[target + f"mlp.c_proj.{kind}"] = hub[source + f"mlp.fc2.{kind}"]
                sd[target + f"ln_2.{kind}"] = hub[source + f"layer_norm2.{kind}"]
    sd["visual.class_embedding"] = hub["vision_model.embeddings.class_embedding"]
    sd["visual.positional_embedding"] = hub["vision_model.embeddings.position_embedding.weight"]
    sd["visual.conv1.weight"] = hub["vision_model.embeddings.patch_embedding.weight"]
    for kind in ("weight", "bias"):
        sd[f"visual.ln_pre.{kind}"] = hub[f"vision_model.pre_layrnorm.{kind}"]
        sd[f"visual.ln_post.{kind}"] = hub[f"vision_model.post_layernorm.{kind}"]
        sd[f"ln_final.{kind}"] = hub[f"text_model.final_layer_norm.{kind}"]
    sd["visual.proj"] = hub["visual_projection.weight"].T.contiguous()
    sd["token_embedding.weight"] = hub["text_model.embeddings.token_embedding.weight"]
    sd["positional_embedding"] = hub["text_model.embeddings.position_embedding.weight"]
    sd["text_projection"] = hub["text_projection.weight"].T.contiguous()
    return sd


@pytest.mark.parametrize("form", ["torchscript", "state_dict_file", "dict"])
def test_openai_clip_equals_the_hub_format(form, tmp_path):
    hub = tiny_hub_clip()
    openai = hub_to_openai_layout(hub)
    if form == "torchscript":
        source = save_torchscript(tmp_path / "ViT-B-16.pt", {k: v.half() for k, v in openai.items()})
        assert any(name.endswith("constants.pkl") for name in zipfile.ZipFile(source).namelist())
    elif form == "state_dict_file":
        source = tmp_path / "openai_state.pt"
        torch.save(openai, source)
    else:
        source = openai
    loaded = load_openai_clip(source, vision_num_heads=VISION_HEADS, text_num_heads=TEXT_HEADS)
    expected, found = hub.state_dict(), loaded.state_dict()
    assert expected.keys() == found.keys()
    for name in expected:
        assert found[name].dtype == torch.float32
        assert torch.equal(expected[name], found[name]), name

    # Through from_clip, both routes give the same CLIP-RC model: same text embeddings and image features.
    torch.manual_seed(1)
    from_openai = CLIPRCForSemanticSegmentation.from_clip(loaded, tiny_config()).eval()
    torch.manual_seed(1)
    from_hub = CLIPRCForSemanticSegmentation.from_clip(hub, tiny_config()).eval()
    ids = prompt_ids()
    assert torch.equal(from_openai.clip_rc.encode_class_prompts(ids), from_hub.clip_rc.encode_class_prompts(ids))
    pixel_values = torch.randn(1, 3, CROP, CROP)
    with torch.no_grad():
        features_openai = from_openai.clip_rc(pixel_values)
        features_hub = from_hub.clip_rc(pixel_values)
    for name in ("image_embeds", "patch_embeds", "region_embeds"):
        assert torch.equal(getattr(features_openai, name), getattr(features_hub, name)), name
    # ... and the text embeddings of OpenAI's own formula (EOT = argmax token) on the OpenAI-layout weights.
    torch.testing.assert_close(
        from_openai.clip_rc.encode_class_prompts(ids),
        reference_text_embeddings(openai, ids, TEXT_HEADS, prefix=""),
        atol=1e-5,
        rtol=0,
    )


def test_openai_loader_reads_the_architecture_and_rejects_bad_input(tmp_path):
    openai = hub_to_openai_layout(tiny_hub_clip())
    config = load_openai_clip(openai, vision_num_heads=4, text_num_heads=4).config
    assert config.vision_config.image_size == 32 and config.vision_config.patch_size == PATCH
    assert config.text_config.max_position_embeddings == CONTEXT and config.projection_dim == E
    with pytest.raises(CheckpointConversionError, match="multiple of 64"):
        load_openai_clip(openai)  # 32 wide: OpenAI's heads = width / 64 does not apply
    broken = dict(openai)
    broken["visual.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointConversionError, match="unexpected tensors.*visual.extra"):
        load_openai_clip(broken, vision_num_heads=4, text_num_heads=4)


# ---- command line -------------------------------------------------------------------------------------------------


def _folder_snapshot(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def test_cli_writes_a_loadable_folder_and_keeps_a_good_one_on_failure(tmp_path, capsys):
    sd = random_reference_state_dict(seed=5)
    checkpoint = write_checkpoint(tmp_path / "voc_zero.pth", sd)
    tiny_config().save_pretrained(tmp_path / "config")
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    output = tmp_path / "out"
    argv = [
        "--checkpoint",
        str(checkpoint),
        "--config",
        str(tmp_path / "config"),
        "--output_dir",
        str(output),
        "--tokenizer",
        str(tmp_path / "tokenizer"),
    ]
    assert main(argv) == 0
    assert "Converted" in capsys.readouterr().out
    assert (output / "model.safetensors").exists() and (output / "config.json").exists()
    assert (output / "tokenizer_config.json").exists()

    expected = convert_original_checkpoint(checkpoint, config=tiny_config(), tokenizer=tokenizer).eval()
    loaded = AutoModelForSemanticSegmentation.from_pretrained(output, trust_remote_code=True).eval()
    pixel_values = torch.randn(1, 3, CROP, CROP)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values).logits, expected(pixel_values).logits)
    # Class embeddings were computed with the converted text tower from the config's classes and templates.
    processor = CLIPRCProcessor(CLIPRCImageProcessor.from_model_config(tiny_config()), tokenizer)
    prompts = processor.tokenize_class_names(
        tiny_config().class_names, tiny_config().prompt_templates, return_tensors="pt"
    )
    torch.testing.assert_close(
        loaded.class_embeddings, expected.clip_rc.encode_class_prompts(prompts["input_ids"], prompts["attention_mask"])
    )
    assert loaded.class_embeddings.abs().sum() > 0

    # A failed conversion (bad file) leaves the good folder untouched and no temporary folder behind.
    snapshot = _folder_snapshot(output)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(checkpoint.read_bytes()[:1000])
    assert main([*argv[:1], str(truncated), *argv[2:]]) == 1
    assert "truncated.pth" in capsys.readouterr().err
    assert _folder_snapshot(output) == snapshot

    # A failure while writing (after some files were written) also leaves it untouched.
    original_save = CLIPRCForSemanticSegmentation.save_pretrained

    def failing_save(self, folder, *args, **kwargs):
        original_save(self, folder, *args, **kwargs)
        raise RuntimeError("disk full")

    CLIPRCForSemanticSegmentation.save_pretrained = failing_save
    try:
        with pytest.raises(RuntimeError, match="disk full"):
            main(argv)
    finally:
        CLIPRCForSemanticSegmentation.save_pretrained = original_save
    assert _folder_snapshot(output) == snapshot
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".out")) == []


def test_cli_to_original_writes_a_reference_checkpoint(tmp_path):
    sd = random_reference_state_dict(seed=2)
    model = convert_original_checkpoint(sd, config=tiny_config(), class_embeddings=torch.randn(3, E))
    model.save_pretrained(tmp_path / "trained")
    assert (
        main(["--to-original", "--checkpoint", str(tmp_path / "trained"), "--output_dir", str(tmp_path / "ref.pth")])
        == 0
    )
    checkpoint = torch.load(tmp_path / "ref.pth", weights_only=True)
    assert set(checkpoint) == {"state_dict", "meta"}
    assert checkpoint["meta"]["CLASSES"] == ("cat", "dog", "grass")
    assert checkpoint["state_dict"].keys() == sd.keys()
    for name, tensor in sd.items():
        if "self_attn" not in name and "norm1" not in name:
            assert torch.equal(checkpoint["state_dict"][name], tensor), name
    import numpy as np

    embeddings = np.load(tmp_path / "ref_text_embedding.npy")
    assert embeddings.shape == (3, E)
    torch.testing.assert_close(torch.from_numpy(embeddings), model.class_embeddings)
    # And the written checkpoint converts back to the same model.
    back = convert_original_checkpoint(
        tmp_path / "ref.pth", config=tiny_config(), class_embeddings=tmp_path / "ref_text_embedding.npy"
    )
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_save_original_checkpoint_skips_embeddings_when_unset(tmp_path):
    model = convert_original_checkpoint(random_reference_state_dict(), config=tiny_config())
    written = save_original_checkpoint(model, tmp_path / "model.pth", include_unused_weights=False)
    assert written == [tmp_path / "model.pth"]
    assert not any("norm1" in name for name in torch.load(written[0], weights_only=True)["state_dict"])


# ---- parameter and FLOP report ------------------------------------------------------------------------------------


def test_flop_report_counts_and_splits(tmp_path, capsys):
    config = tiny_config()
    report = flop_report(config, num_classes=5)
    parameters, flops = report["parameters"], report["flops"]
    for part in ("vision", "text", "head"):
        assert parameters[part]["total"] > 0, part
    assert parameters["text"]["trainable"] == 0
    assert 0 < parameters["vision"]["trainable"] < parameters["vision"]["total"]
    assert parameters["head"]["trainable"] == parameters["head"]["total"]
    assert parameters["total"]["total"] == sum(parameters[part]["total"] for part in ("vision", "text", "head"))
    for key in ("vision", "head", "head_recovery", "text_per_prompt"):
        assert flops[key] > 0, key
    assert flops["per_crop"] == flops["vision"] + flops["head"]
    assert flops["text_all_classes"] == 5 * flops["text_per_prompt"]
    # The head grows with the class count, the image tower does not.
    more = flop_report(config, num_classes=10)["flops"]
    assert more["head"] > flops["head"] and more["vision"] == flops["vision"]
    # meta-device counts equal counts on real weights.
    assert flop_report(config, num_classes=5, device="cpu")["flops"] == flops
    assert "image tower" in format_report(report)

    config.save_pretrained(tmp_path / "cfg")
    assert main_flops([str(tmp_path / "cfg"), "--json", str(tmp_path / "report.json")]) == 0
    assert "GFLOPs" in capsys.readouterr().out and (tmp_path / "report.json").exists()
    assert main_flops(["no-such-preset"]) == 1
