"""TaI-DPT's published recipe as experiments (``experiment={voc2007,coco2014,nuswide}_zs``): every setting of
its configs composes to the value TaI-DPT ran (docs/taidpt_recipe.md has the source line of each), for
``model=taidpt`` and ``model=dbtr`` alike; and the recipe's non-data keys run end to end through dbtr-train
with the tiny data and CLIP swapped in (no RN50 weights or benchmark images here)."""

from __future__ import annotations

import csv
import inspect
import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cli_helpers import run_cli
from dbtr.data.images import CLIP_MEAN, CLIP_STD
from dbtr.losses import ranking_loss
from dbtr.models.heads import DualBranchHead
from dbtr.utils.hydra_utils import CONFIG_DIR

# TaI-DPT's values, written from its configs (configs/trainers/Caption_distill_double/rn50_<dataset>.yaml,
# train_caption.py, datasets/<dataset>_distill.py), not from dbtr's config files
TAIDPT = {
    "voc2007_zs": {"classes": 20, "lr": 1e-4, "tau_image": 40.0, "ids": True, "max_per_class": None},
    "coco2014_zs": {"classes": 80, "lr": 1e-4, "tau_image": 40.0, "ids": True, "max_per_class": None},
    "nuswide_zs": {"classes": 81, "lr": 1e-3, "tau_image": 4.0, "ids": False, "max_per_class": 1000},
}
# the prompt text of the classes whose TaI-DPT name is not dbtr's default prompt (datasets/data_helpers.py)
OWN_NAMES = {
    "voc2007_zs": {"diningtable": "diningtable", "pottedplant": "pottedplant", "tvmonitor": "tvmonitor"},
    "coco2014_zs": {"motorcycle": "motor bike", "airplane": "aeroplane"},
    "nuswide_zs": {"birds": "birds", "swimmers": "swimmers"},
}


def _compose(overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        return compose(config_name="train.yaml", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("model", ["taidpt", "dbtr"])
@pytest.mark.parametrize("experiment", sorted(TAIDPT))
def test_recipe_composes_to_taidpts_settings(experiment, model):
    want = TAIDPT[experiment]
    cfg = _compose(
        [f"experiment={experiment}", f"model={model}", "paths.data_dir=/data", "paths.output_dir=/o"]
    )
    c = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("clip", "data", "model", "trainer")}
    clip, data, m = c["clip"], c["data"], c["model"]
    # backbone and features: RN50 (MODEL.BACKBONE.NAME), fp32 (PREC), attnpool(if_pos=False), v/c-proj dense
    assert cfg.hydra.runtime.choices.clip == "rn50" and clip["resnet"]["arch"] == "RN50"
    assert (
        clip["resnet"]["positional"] is False and clip["dense"] == "maskclip" and clip["dtype"] == "float32"
    )
    assert clip["max_length"] == 77  # clip.tokenize's context length
    # preprocessing: INPUT.SIZE 224 = the RN50 file's resolution (null: taken from the CLIP), CLIP mean/std;
    # resize + centre crop are ClipImageTransform's (tests/test_data.py::test_clip_transform_geometry_...)
    assert data["image_size"] is None and data.get("fast_decode", False) is False
    assert tuple(data.get("mean", CLIP_MEAN)) == CLIP_MEAN and tuple(data.get("std", CLIP_STD)) == CLIP_STD
    # loaders: TRAIN_X 512 with drop_last, TEST 100
    assert (data["batch_size"], data["drop_last"], data["eval_batch_size"]) == (512, True, 100)
    # training text: TaI-DPT's synonyms and class names, sampled captions, 10 x "a photo of a" + 80 templates
    corpus = data["corpus"]
    assert corpus["vocabulary"] == f"taidpt_{experiment[:-3]}" and corpus["prompt_names"] == "vocabulary"
    assert corpus["class_sentences"] == 9 and corpus["max_per_class"] == want["max_per_class"]
    (source,) = corpus["sources"]
    if want["ids"]:
        assert source["type"] == "coco_captions" and source["path"].endswith("captions_train2017.json")
        assert source["ids"].endswith("coco_caption_text_embed_sampled_idx.pkl")
    else:
        assert source == {
            "type": "narratives",
            "path": "/data/openimages/open_images_train_v6_captions.jsonl",
        }
    # head: fixed logit scale 4, spatial scales 50 / (40 | 4), GL_merge_rate 0.5, no caption noise
    head = DualBranchHead(want["classes"], 32, **m["head"])
    assert (head.logit_scale, head.tau_text, head.tau_image) == (4.0, 50.0, want["tau_image"])
    assert head.merge_weight == 0.5 and head.feature_noise_std == 0.0 and head.center_scores is False
    # loss: double_ranking, ranking_loss(scale_=1.0, margin_=1) on each branch
    assert m["loss"] == "ranking" and m["loss_kwargs"] == {}
    assert inspect.signature(ranking_loss).parameters["margin"].default == 1.0
    # schedule: 20 epochs, cosine, 1 constant warm-up epoch at 1e-5, stepped per epoch (Dassl)
    assert c["trainer"]["max_epochs"] == 20
    assert m["scheduler"] == {"name": "cosine", "warmup_epochs": 1, "warmup_lr": 1e-5, "interval": "epoch"}
    assert m["evaluation"]["difficult"] == "negative"  # the evaluator's mAP counts only label 1 as positive
    assert cfg.seed == 1  # scripts/main.sh runs seeds 1, 2, 3: dbtr-train -m ... seed=1,2,3
    if (
        model == "taidpt"
    ):  # N_CTX 16, CSC False, CTX_INIT "", N(0, 0.02^2); SGD (Dassl: momentum 0.9, wd 5e-4)
        assert m["prompts"] == {"n_ctx": 16, "ctx_init": None, "ctx_std": 0.02, "class_specific": False}
        assert m["optimizer"] == {"name": "sgd", "lr": want["lr"], "weight_decay": 5e-4, "momentum": 0.9}
        assert not head.trainable and head.pfa == "none"
    else:  # the paper's method on the same footing, with its own optimiser (lr 1e-3 on NUS-WIDE for all)
        assert m["optimizer"]["name"] == "adam" and m["optimizer"]["lr"] == (
            want["lr"] if want["lr"] > 1e-4 else 2e-4
        )
        assert head.trainable and head.pfa == "both" and m.get("prompts") is None


@pytest.mark.parametrize("experiment", sorted(TAIDPT))
def test_recipe_datamodule_prompts_taidpts_class_names(experiment):
    dm = instantiate(
        _compose([f"experiment={experiment}", "paths.data_dir=/data"]).data
    )  # reads no dataset file
    assert dm.num_classes == TAIDPT[experiment]["classes"]
    assert {k: dm.prompt_names[k] for k in OWN_NAMES[experiment]} == OWN_NAMES[experiment]
    assert set(dm.prompt_names) == set(dm.class_names)


def _lrs(run) -> list[float]:
    (log,) = run.glob("csv/**/metrics.csv")
    with log.open() as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("lr-SGD")]
    return [float(r["lr-SGD"]) for r in rows]


@pytest.mark.parametrize("experiment", ["voc2007_zs", pytest.param("nuswide_zs", marks=pytest.mark.slow)])
def test_recipe_trains_end_to_end_on_the_tiny_data(experiment, demo_dir, tmp_path):
    """experiment=<dataset>_zs model=taidpt with only the data and CLIP swapped for the tiny fixture: the
    recipe's prompts, SGD, per-epoch Dassl schedule, drop_last and loader settings run through dbtr-train."""
    run = tmp_path / "run"
    run_cli(
        "dbtr-train",
        f"experiment={experiment}",
        "model=taidpt",
        "data=tiny",
        "clip=tiny",
        f"paths.tiny_dir={demo_dir}",
        "trainer.max_epochs=3",
        f"cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["test/mAP"] <= 100.0 and metrics["selection"]["monitor"] == "val/mAP"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert set(ckpt["state_dict"]) == {"head.prompts.ctx_global", "head.prompts.ctx_local"}
    assert ckpt["state_dict"]["head.prompts.ctx_global"].shape[0] == 16
    hp = ckpt["hyper_parameters"]
    assert hp["optimizer"]["name"] == "sgd" and hp["scheduler"]["interval"] == "epoch"
    # 96 tiny captions at batch 64: drop_last leaves one step per epoch (two without it)
    assert ckpt["global_step"] == 3
    # Dassl's schedule, one lr per epoch: the warm-up's 1e-5, then cos(pi (e - 1) / 3) from the base lr
    lr = TAIDPT[experiment]["lr"]
    want = [1e-5] + [lr * 0.5 * (1 + math.cos(math.pi * (e - 1) / 3)) for e in (1, 2)]
    assert _lrs(run) == pytest.approx(want, rel=1e-6)
