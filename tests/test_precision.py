"""`--dtype auto|fp32|bf16|fp16`: bf16 autocast only where the processor multiplies bf16 fast, and what it does to
the label maps."""

import pytest
import torch

from clip_rc import precision
from clip_rc.commands.evaluate import parse_args as parse_eval_args
from clip_rc.commands.predict import parse_args as parse_predict_args
from clip_rc.commands.train import TrainingArguments, _mixed_precision
from clip_rc.image_processing_clip_rc import CLIPRCImageProcessor
from clip_rc.precision import autocast, fast_bf16_matmul, mixed_precision_of, resolve_dtype

from .conftest import tiny_config, tiny_model


def test_explicit_dtypes_pass_through_and_unknown_ones_are_refused():
    assert [resolve_dtype(name) for name in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("float32")
    assert [mixed_precision_of(name) for name in ("fp32", "bf16", "fp16")] == ["no", "bf16", "fp16"]


@pytest.mark.parametrize(
    ("flags", "speedup", "expected"),
    [
        ({"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_bf16": False}, 2.1, True),
        ({"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_bf16": False}, 1.1, False),  # flags, no gain
        ({"avx2": True, "avx512f": False, "avx512_bf16": False, "amx_bf16": False}, 5.0, False),  # emulated bf16
        ({"avx2": True, "avx512f": True, "avx512_bf16": False, "amx_bf16": True}, 3.0, True),
    ],
)
def test_auto_picks_bf16_only_on_cpus_with_native_and_fast_bf16_products(monkeypatch, flags, speedup, expected):
    monkeypatch.setattr(precision, "cpu_description", lambda: {"flags": flags})
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(precision, "bf16_matmul_speedup", lambda: speedup)
    assert fast_bf16_matmul("cpu") is expected
    assert resolve_dtype("auto", "cpu") == ("bf16" if expected else "fp32")


def test_the_bf16_timing_measures_both_products_on_this_machine():
    speedup = precision.bf16_matmul_speedup()
    assert 0 < speedup < 100
    assert precision.bf16_matmul_speedup() == speedup  # measured once per process
    description = precision.cpu_description()
    assert description["cpu"] and description["torch"] == torch.__version__
    assert description["cpu"] in precision.format_cpu_description(description)


def test_autocast_lowers_matrix_products_only_for_reduced_dtypes():
    linear = torch.nn.Linear(4, 3)
    inputs = torch.randn(2, 4)
    with autocast("bf16"):
        assert linear(inputs).dtype == torch.bfloat16
    with autocast("fp32"):
        assert linear(inputs).dtype == torch.float32


def test_commands_take_a_dtype(tmp_path):
    image = tmp_path / "image.png"
    image.write_bytes(b"")
    assert parse_predict_args([str(image), "--model", "m", "--dtype", "auto"]).dtype == "auto"
    assert parse_eval_args(["--model", "m", "--data_root", str(tmp_path)]).dtype == "fp32"
    assert _mixed_precision(TrainingArguments(output_dir=str(tmp_path), dtype="fp32")) == "no"
    assert _mixed_precision(TrainingArguments(output_dir=str(tmp_path), mixed_precision="bf16")) == "bf16"
    with pytest.raises(ValueError, match="at most one of --dtype and --mixed_precision"):
        _mixed_precision(TrainingArguments(output_dir=str(tmp_path), dtype="bf16", mixed_precision="bf16"))


def test_bf16_label_maps_mostly_agree_with_fp32():
    """bf16 autocast changes a random model's label maps only where scores tie or nearly tie: such a model's logits
    are large (tens), so most pixels have several classes at a saturated sigmoid, where the tie goes to the lowest
    class and bf16's ~0.4 % rounding decides which classes saturate. The full-size figures are in the README
    (Performance); a tiny model shows the same."""
    model = tiny_model(tiny_config(id2label={i: f"class {i}" for i in range(20)}, seen_class_ids=None)).eval()
    processor = CLIPRCImageProcessor.from_model_config(model.config)
    torch.manual_seed(0)
    pixel_values = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        expected = torch.stack(processor.post_process_semantic_segmentation(model(pixel_values)))
        with autocast("bf16"):
            outputs = model(pixel_values)
        labels = torch.stack(processor.post_process_semantic_segmentation(outputs))
    assert outputs.logits.dtype == torch.float32  # the final product runs in fp32
    agreement = (labels == expected).float().mean().item()
    assert 0.98 <= agreement < 1.0


def test_a_training_step_runs_under_bf16_autocast():
    """The fused losses, attention with dropout and dropout run their backward passes under the forward pass's
    autocast state; the step's loss and gradients stay close to fp32's."""
    model = tiny_model(tiny_config(decoder_attention_dropout=0.1)).train()
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))

    def step(dtype):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        with autocast(dtype):
            loss = model(pixel_values, labels=labels).loss
        loss.backward()
        return loss.detach(), model.decode_head.q_proj.weight.grad.clone()

    loss, gradient = step("bf16")
    expected_loss, expected_gradient = step("fp32")
    assert gradient.dtype == torch.float32 and torch.isfinite(gradient).all()
    torch.testing.assert_close(loss, expected_loss, rtol=0.05, atol=0.0)
    assert torch.nn.functional.cosine_similarity(gradient.flatten(), expected_gradient.flatten(), dim=0) > 0.95
