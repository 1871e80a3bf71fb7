"""The speed benchmark runs end to end on a tiny configuration and writes valid JSON."""

import json

import torch

from clip_rc.commands.speed import run_benchmark


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
