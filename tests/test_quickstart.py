"""The README quickstart, run as written on a toy-world checkpoint (whose mean/std are not CLIP's), scores
exactly what dbtr-predict scores; and the one loader is what dbtr-eval and dbtr-train's test measure."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
CKPT_IN_README = "logs/train/runs/<run>/checkpoints/last.ckpt"


def quickstart_code() -> str:
    section = README.read_text().split("## Quickstart in Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert CKPT_IN_README in code and '"photo.jpg"' in code, "the quickstart no longer names its inputs"
    return code


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, cli):
    """A one-epoch dbtr-train experiment=toyworld on a small toy world (the warm-up is shortened, not
    refused)."""
    root = tmp_path_factory.mktemp("quickstart")
    run, world = root / "run", root / "world" / "world0"
    proc = cli(
        "dbtr-train",
        "experiment=toyworld",
        f"paths.toyworld_dir={world.parent}",
        "data.num_captions=400",
        "data.num_val=24",
        "data.num_test=40",
        "trainer.max_epochs=1",
        "logger=none",
        "~callbacks.eval_plots",
        f"hydra.run.dir={run}",
        cwd=root,
    )
    return run, world, proc


def test_one_epoch_run_shortens_the_warmup_and_prints_one_table(toy_run):
    run, _, proc = toy_run
    out = proc.stdout + proc.stderr
    assert "covers the whole run" in out and "warm-up shortened" in out
    assert out.count("test metrics (%)") == 1 and "Test metric" not in out  # ours only, not Lightning's too
    assert f"run folder: {run}" in proc.stdout


def test_readme_quickstart_scores_a_toyworld_checkpoint_like_dbtr_predict(toy_run, cli, tmp_path):
    run, world, _ = toy_run
    ckpt = json.loads((run / "metrics.json").read_text())["checkpoint"]
    test_names = [
        json.loads(line)["file_name"] for line in (world / "test.jsonl").read_text().splitlines()[:5]
    ]
    images = [world / "images" / n for n in test_names]
    cli(
        "dbtr-predict",
        ckpt,
        *map(str, images),
        "-o",
        str(tmp_path / "pred.jsonl"),
        "-k",
        "3",
        "--device",
        "cpu",
        cwd=tmp_path,
    )
    predicted = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert [p["image"] for p in predicted] == list(map(str, images))

    code = quickstart_code().replace(CKPT_IN_README, ckpt)
    for image, want in zip(images, predicted):
        ns: dict = {}
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            exec(compile(code.replace('"photo.jpg"', repr(str(image))), "README quickstart", "exec"), ns)  # noqa: S102
        got = ast.literal_eval(printed.getvalue())  # the list of (class, score) it prints
        assert [name for name, _ in got] == [t["label"] for t in want["top"]]
        assert [s for _, s in got] == pytest.approx([t["score"] for t in want["top"]], abs=2e-3)
        assert ns["out"].logits[0].topk(3).values.tolist() == pytest.approx(
            [t["score"] for t in want["top"]], abs=1e-6
        )
    # the checkpoint's own preprocessing, not CLIP's: CLIP's mean/std would give other scores
    transform = ns["transform"]
    assert transform.mean.flatten().tolist() == [0.5, 0.5, 0.5] and transform.size == 64
    from dbtr.data.images import ClipImageTransform, load_image

    with torch.no_grad():
        clip_norm = ns["model"](ClipImageTransform(64)(load_image(images[-1]))[None]).logits
    assert not torch.allclose(clip_norm, ns["out"].logits, atol=1e-3)


def test_loaded_checkpoint_reproduces_the_training_runs_test(toy_run):
    """The loader's model on the test split = what dbtr-train's test step measured (trainer.test on the best
    epoch)."""
    import dbtr
    from dbtr.data.images import ImageDataset, read_image_jsonl
    from dbtr.metrics import mean_average_precision

    run, world, _ = toy_run
    metrics = json.loads((run / "metrics.json").read_text())
    model, transform = dbtr.load_checkpoint(metrics["checkpoint"])
    records = read_image_jsonl(world / "images", world / "test.jsonl", model.class_names)
    ds = ImageDataset(records, transform)
    with torch.no_grad():
        scores = model(torch.stack([ds[i]["pixel_values"] for i in range(len(ds))])).logits
    assert mean_average_precision(scores, records.labels) == pytest.approx(
        metrics["test"]["test/mAP"], abs=1e-3
    )
    meta = torch.load(metrics["checkpoint"], map_location="cpu", weights_only=True)["dbtr"]
    assert meta["preprocessing"] == {"image_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3}
    assert meta["run"]["choices"]["model"] == "dbtr" and meta["run"]["seed"] == 1
