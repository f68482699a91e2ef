"""Two CPU processes (DDP, gloo) against one: the same training steps, metrics over the whole split.

Why the runs can be compared directly: ``data.batch_size`` is the global batch, and the caption sampler
(:class:`dbtr.data.sampling.GlobalBatchSampler`) orders the captions from (seed, epoch) and gives each process
one half of every single-process batch. DDP averages the two half-batch gradients, which (halves of equal
size, a mean-over-batch loss) is the single-process gradient up to float summation order. So the same seed
gives the same optimizer steps and weights equal to ~1e-9, not bitwise; the test asserts closeness of the
weights and equality of the metrics within 1e-4. Evaluation does not depend on that: the DDP run's final test
(two processes) is compared with a single-process ``dbtr-eval`` of the very same checkpoint, which must agree
exactly, image count included. The splits have odd sizes (23 val, 31 test images) so DistributedSampler pads
one process with a repeated image, which the score collector must drop.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_helpers import run_cli

pytestmark = pytest.mark.slow  # two training runs and a two-process one: `make test-slow`


@pytest.fixture(scope="module")
def odd_splits(demo_dir, tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("odd")
    for split, n in (("val", 23), ("test", 31)):
        lines = (demo_dir / f"{split}.jsonl").read_text().splitlines()[:n]
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return [f"data.val_labels={root / 'val.jsonl'}", f"data.test_labels={root / 'test.jsonl'}"]


@pytest.fixture(scope="module")
def runs(demo_dir, odd_splits, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    common = [
        "experiment=tiny_full",
        f"paths.tiny_dir={demo_dir}",
        *odd_splits,
        "seed=3",
        "trainer.max_epochs=3",
        "quiet=true",
    ]
    out = {"single": root / "single", "ddp": root / "ddp"}
    run_cli("dbtr-train", *common, f"hydra.run.dir={out['single']}", cwd=root)
    run_cli(
        "dbtr-train",
        *common,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"hydra.run.dir={out['ddp']}",
        cwd=root,
        timeout=300,
    )
    return out


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_two_process_training_matches_one_process(runs):
    single, ddp = _metrics(runs["single"]), _metrics(runs["ddp"])
    assert ddp["config"]["trainer"]["devices"] == 2 and ddp["config"]["trainer"]["strategy"] == "ddp"
    assert (runs["ddp"] / "train_ddp_process_1.log").is_file()  # a second process really ran
    assert ddp["test"]["test/num_images"] == single["test"]["test/num_images"] == 31
    assert abs(ddp["test"]["test/mAP"] - single["test"]["test/mAP"]) < 1e-4
    assert abs(ddp["selection"]["best_score"] - single["selection"]["best_score"]) < 1e-4
    assert Path(ddp["checkpoint"]).name == Path(single["checkpoint"]).name  # the same epoch was selected
    heads = [torch.load(runs[k] / "checkpoints" / "last.ckpt", weights_only=True) for k in ("single", "ddp")]
    assert heads[0]["global_step"] == heads[1]["global_step"] == 3 * 2  # 96 captions, global batch 64
    for key, want in heads[0]["state_dict"].items():
        torch.testing.assert_close(heads[1]["state_dict"][key], want, rtol=0, atol=1e-7)
    assert heads[0]["state_dict"]["head.global_classifier.residual"].abs().max() > 1e-4  # it trained


def test_same_checkpoint_scores_identically_on_one_and_two_processes(runs, demo_dir, odd_splits, tmp_path):
    ddp = _metrics(runs["ddp"])  # its test ran on two processes
    run_cli(
        "dbtr-eval",
        f"ckpt_path={ddp['checkpoint']}",
        "data=tiny",
        f"paths.tiny_dir={demo_dir}",
        *odd_splits,
        "quiet=true",
        f"hydra.run.dir={tmp_path / 'eval'}",
        cwd=tmp_path,
    )
    one = _metrics(tmp_path / "eval")["test"]
    assert one["test/num_images"] == ddp["test"]["test/num_images"] == 31
    for key in ("test/mAP", "test/mAP_global", "test/mAP_local", "test/CF1@3", "test/OF1@3"):
        assert abs(one[key] - ddp["test"][key]) < 1e-4, key
    assert one["test/per_class_AP"] == ddp["test"]["test/per_class_AP"]
