"""The speed benchmark runs end to end on a tiny configuration and writes valid JSON."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clip_rc.commands.speed import _case_step, run_benchmark
from clip_rc.profiling import count_flops, random_preset_model

from .colour_block_data import make_segmentation_dataset
from .random_clip import save_random_clip
from .test_evaluation import save_model_folder


@pytest.mark.slow
def test_benchmark_writes_a_report(tmp_path, capsys):
    threads = torch.get_num_threads()
    path = tmp_path / "bench.json"
    report = run_benchmark(["--tiny", "--cases", "inference-20", "train-20", "--dtypes", "fp32", "--batch_sizes", "2",
                   "--runs", "1", "--warmup", "0", "--threads", "1", "--gradient_checkpointing",
                   "--json", str(path)])  # fmt: skip
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))
    results = {result["name"]: result for result in report["results"] if not result["gradient_checkpointing"]}
    checkpointed = [result for result in report["results"] if result["gradient_checkpointing"]]
    assert set(results) == {"inference-20", "train-20"} and [r["name"] for r in checkpointed] == ["train-20"]
    # Recomputing the image tower's layers in the backward pass costs about one more forward pass of FLOPs.
    assert checkpointed[0]["gflop_per_crop"] > results["train-20"]["gflop_per_crop"]
    for result in results.values():
        assert result["batch_size"] == 2 and result["dtype"] == "fp32" and not result["compiled"]
        assert result["seconds_per_crop"] > 0 and result["peak_memory_mb"] > 0
        assert result["gflop_per_crop"] > 0
    # A training step does the forward pass and more (backward through the prompts and the head).
    assert results["train-20"]["gflop_per_crop"] > 2 * results["inference-20"]["gflop_per_crop"]
    assert report["matmul_peak_gflops"]["fp32"] > 0
    assert "inference-20" in capsys.readouterr().out
    assert torch.get_num_threads() == threads  # the measurement leaves the caller's thread count alone


@pytest.mark.slow
def test_report_gives_each_case_its_fraction_of_the_matmul_peak_and_the_machine(tmp_path, capsys):
    report = run_benchmark(["--tiny", "--cases", "inference-20", "--dtypes", "fp32", "auto", "--batch_sizes", "1", "--runs", "1",
                   "--warmup", "0", "--threads", "1"])  # fmt: skip
    dtypes = [result["dtype"] for result in report["results"]]
    # auto resolves to fp32 or bf16 on this machine, reported under the resolved name (once if it is fp32).
    assert dtypes[0] == "fp32" and set(dtypes) <= {"fp32", "bf16"} and len(dtypes) == len(set(dtypes))
    for result in report["results"]:
        peak = report["matmul_peak_gflops"][result["dtype"]]
        assert result["fraction_of_peak"] == pytest.approx(result["achieved_gflops"] / peak)
    machine = report["machine"]
    assert machine["threads"] == 1 and machine["torch"] == torch.__version__ and machine["cpu"]
    output = capsys.readouterr().out
    assert machine["cpu"] in output and "% peak" in output


def test_flop_count_includes_cpu_attention_kernels():
    query, key, value = (torch.randn(1, 2, length, 8, requires_grad=True) for length in (5, 7, 7))

    def step():
        torch.nn.functional.scaled_dot_product_attention(query, key, value).sum().backward()

    forward = 4 * 2 * 5 * 7 * 8  # q k^T and p v, 2 FLOPs per multiply-add
    assert count_flops(step) == forward + int(2.5 * forward)


@pytest.mark.parametrize("training", [False, True])
def test_inference_steps_run_without_autograd_as_the_inference_path_does(training):
    model = random_preset_model("voc-inductive", tiny=True).train(training)
    grad_enabled = []
    model.decode_head.register_forward_hook(lambda *args: grad_enabled.append(torch.is_grad_enabled()))
    _case_step(model, batch_size=1, training=training, autocast_dtype=None, device=torch.device("cpu"))()
    assert grad_enabled == [training]


def test_unknown_cases_are_refused_naming_the_case(capsys):
    with pytest.raises(SystemExit):
        run_benchmark(["--tiny", "--cases", "inference-7"])
    assert "inference-7" in capsys.readouterr().err


def test_random_preset_models_keep_the_presets_share_of_unseen_classes():
    voc = random_preset_model("voc-inductive", tiny=True)
    assert voc.config.unseen_class_ids == [15, 16, 17, 18, 19] and voc.class_embeddings.shape == (20, 24)
    open_vocabulary = random_preset_model("coco-stuff-inductive", 1000, tiny=True)
    # COCO-Stuff holds out 15 of 171 classes: 88 of 1000, the last ones.
    assert open_vocabulary.config.unseen_class_ids == list(range(912, 1000))
    assert open_vocabulary.class_embeddings.shape == (1000, 24) and open_vocabulary.config.num_labels == 1000
    fully = random_preset_model("coco-stuff-fully", 40, tiny=True)
    # The fully supervised preset trains on every class and keeps the split only to report seen / unseen IoU.
    assert fully.config.setting == "fully" and fully.config.unseen_class_ids == [36, 37, 38, 39]


# The workplace's side-by-side harness (`../shared/reference-speed`, beside the checkout in CI) builds our side with
# `CLIPRCConfig.from_preset`, `sliding_window_labels` and `model(pixel_values, text_embeds, labels)`.
SHARED_HARNESS = Path(__file__).resolve().parents[2] / "shared" / "reference-speed" / "side_by_side.py"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["eval-1000", "train-156"])
def test_the_shared_side_by_side_harness_runs_our_side(case):
    if not SHARED_HARNESS.exists():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{SHARED_HARNESS} is missing: CI runs with ../shared beside the checkout.")
        pytest.skip(f"{SHARED_HARNESS} is not beside this checkout.")
    command = [sys.executable, str(SHARED_HARNESS), "--side", case, "new", "2"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    measured = json.loads(completed.stdout.strip().splitlines()[-1])
    assert measured["time"] > 0 and measured["rss_gb"] > 0


BF16_AGREEMENT = Path(__file__).resolve().parents[1] / "benchmarks" / "bf16_agreement.py"


def _benchmark_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table_rows(output: str) -> dict[str, list[str]]:
    """`{first cell: other cells}` of the Markdown table rows of a benchmark's output (header rows left out)."""
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in output.splitlines() if line.startswith("| ")]
    return {row[0]: row[1:] for row in rows if row[0] != "variant"}


def test_bf16_agreement_script_reports_each_variant_against_fp32():
    """`benchmarks/bf16_agreement.py` (the README's Precision figures) on a tiny model: fp32 agrees with itself with
    no logit error, each bf16 variant with a share of the pixels and a logit error above zero."""
    command = [sys.executable, str(BF16_AGREEMENT), "--tiny", "--crops", "2", "--threads", "1"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    rows = {
        variant: [float(cell.rstrip("%")) for cell in cells]
        for variant, cells in _table_rows(completed.stdout).items()
    }
    assert set(rows) == {"fp32", "bf16", "bf16, decode head fp32", "bf16 in the tower's feed-forward layers only"}
    assert rows["fp32"][:2] == [100.0, 0.0]
    for agreement, error, seconds in rows.values():
        assert 90.0 <= agreement <= 100.0 and 0.0 <= error < 5.0 and seconds >= 0.0
    assert all(rows[variant][1] > 0.0 for variant in rows if variant != "fp32")


def test_bf16_agreement_script_labels_a_saved_models_dataset_images(tmp_path):
    """With `--model` and `--dataset`, the script labels the split's first `--images` images with a saved model and its
    processor; either option alone is refused."""
    model_dir = save_model_folder(tmp_path / "model", save_random_clip(tmp_path / "clip"))
    dataset_dir = make_segmentation_dataset(tmp_path / "data", num_train=1, num_validation=3, size=(40, 56))
    command = [sys.executable, str(BF16_AGREEMENT), "--model", str(model_dir), "--dataset", str(dataset_dir),
               "--images", "2", "--threads", "1"]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.splitlines()[0] == (
        f"{model_dir}, the first 2 images of {dataset_dir} (validation), 1 threads"
    )
    rows = _table_rows(completed.stdout)
    assert len(rows) == 4 and rows["fp32"][:2] == ["100.00%", "0.00%"]
    assert all(90.0 <= float(cells[0].rstrip("%")) <= 100.0 for cells in rows.values())
    alone = subprocess.run(command[:4], capture_output=True, text=True, timeout=300)
    assert alone.returncode == 2 and "--model and --dataset go together" in alone.stderr


def test_forwards_under_autocast_switches_autocast_per_module_and_restores_them():
    forwards_under_autocast = _benchmark_module(BF16_AGREEMENT).forwards_under_autocast
    model = random_preset_model("voc-inductive", tiny=True).eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    feed_forward_layers = [layer.mlp for layer in model.clip_rc.vision_model.encoder.layers]
    with torch.no_grad():
        features = model.clip_rc(pixel_values)
        expected = model.decode_head(features, model.class_embeddings).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_logits = model.decode_head(features, model.class_embeddings).logits
            with forwards_under_autocast([model.decode_head], enabled=False):
                logits = model.decode_head(features, model.class_embeddings).logits
        hidden_states = torch.randn(1, 5, model.config.vision_config.hidden_size)
        fp32_feed_forward = feed_forward_layers[0](hidden_states)
        with forwards_under_autocast(feed_forward_layers, enabled=True):
            bf16_feed_forward = feed_forward_layers[0](hidden_states)
    assert "forward" not in vars(model.decode_head)
    assert all("forward" not in vars(layer) for layer in feed_forward_layers)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(bf16_logits, expected, rtol=1e-5, atol=1e-5)
    assert bf16_feed_forward.dtype == torch.float32
    assert not torch.equal(bf16_feed_forward, fp32_feed_forward)
    torch.testing.assert_close(bf16_feed_forward, fp32_feed_forward, rtol=0.05, atol=0.05)


ATTENTION_KERNELS = Path(__file__).resolve().parents[1] / "benchmarks" / "attention_kernels.py"


def test_attention_kernels_script_times_each_kernel_and_bounds_a_tower_layer():
    """`benchmarks/attention_kernels.py` (the README's Performance figures) on an 8 x 8 patch grid: every kernel's
    output equals SDPA's, every variant has a time and all but the softmax a rate and a share of the peak."""
    command = [sys.executable, str(ATTENTION_KERNELS), "--grid_size", "8", "--repeats", "1", "--threads", "1"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    rows = _table_rows(completed.stdout)
    assert list(rows) == [
        "blocked attention", "SDPA", "blocked: its two products only", "blocked: its masked softmax only",
        "the layer's six linear products",
    ]  # fmt: skip
    assert completed.stdout.splitlines()[0].startswith("91 tokens, 12 heads of 64, 1 threads")
    assert all(float(cells[0]) > 0 for cells in rows.values())
    assert float(rows["blocked attention"][3]) < 1e-5 and float(rows["SDPA"][3]) == 0.0
    assert rows["blocked: its masked softmax only"][1:] == ["", "", ""]
    assert all(cells[1] and float(cells[2].rstrip("%")) > 0 for name, cells in rows.items() if "softmax" not in name)
    assert "a tower layer at best" in completed.stdout.splitlines()[-1]


def test_attention_kernels_parts_compute_the_kernels_products():
    """The products-only variant multiplies what the blocked kernel multiplies: its blocks, recombined with a
    softmax, give SDPA's output."""
    attention_kernels = _benchmark_module(ATTENTION_KERNELS)
    inputs = attention_kernels.attention_inputs("voc-inductive", grid_size=8)
    query, key, value, mask = inputs["query"], inputs["key"], inputs["value"], inputs["mask"]
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)[0]
    rows = [
        (scaled_query @ keys.t() + mask_rows).softmax(-1) @ value_columns.t()
        for scaled_query, keys, value_columns, mask_rows in attention_kernels._blocks_of(inputs)
    ]
    torch.testing.assert_close(torch.cat(rows).view(expected.shape), expected, rtol=1e-5, atol=1e-5)
    assert inputs["mask"].shape == (91, 91) and [w.shape for w in inputs["weights"]][-2:] == [(3072, 768), (768, 3072)]
