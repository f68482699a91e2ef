"""The benchmark scripts run end to end at toy sizes (the real sizes are for `make bench` and
benchmarks/gpu.sh)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_coco_scale_benchmark_runs_every_model(tmp_path, capsys):
    import bench_coco_scale

    out = tmp_path / "coco.json"
    r = bench_coco_scale.main(
        [
            "--tiny",
            "--captions",
            "700",
            "--batch",
            "64",
            "--classes",
            "6",
            "--steps",
            "1",
            "--prompt-steps",
            "1",
            "--threads",
            "1",
            "--json",
            str(out),
        ]
    )
    assert json.loads(out.read_text())["models"].keys() == {"taskres_global", "dual_noattn", "dbtr", "taidpt"}
    assert r["steps_per_epoch"] == 11 and all(
        m["step_s"] > 0 and m["min_flops"] > 0 for m in r["models"].values()
    )
    # the full method's unavoidable matmuls exceed the no-attention model's; TaI-DPT's text tower dominates
    ms = r["models"]
    assert ms["dbtr"]["min_flops"] > ms["dual_noattn"]["min_flops"] > ms["taskres_global"]["min_flops"]
    assert ms["taidpt"]["min_flops"] > ms["dbtr"]["min_flops"]
    assert "HEADLINE taidpt / dbtr" in capsys.readouterr().out


def test_gpu_check_runs_at_toy_sizes_on_cpu(tmp_path):
    import gpu_bench

    out = tmp_path / "gpu.json"
    gpu_bench.main(["--tiny", "--device", "cpu", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["images"]["full_images_per_s"] > 0 and r["captions"]["captions_per_s"] > 0
    assert r["training"]["epochs_run"] == 2 and not r["training"]["projected"]
    assert (BENCH / "gpu.sh").stat().st_mode & 0o111  # executable
