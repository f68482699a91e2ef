"""Every config composes; every model config builds its head; every experiment composes with train.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dbtr.models.heads import DualBranchHead
from dbtr.utils.hydra_utils import CONFIG_DIR

CONF = Path(CONFIG_DIR)
DATA = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml") if p.stem != "from_checkpoint")


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(config_name=name, overrides=overrides, return_hydra_config=True)


def test_there_is_something_to_compose():
    assert EXPERIMENTS and len(MODELS) >= 7


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(experiment):
    cfg = _compose("train.yaml", [f"experiment={experiment}"])
    assert cfg.model._target_ == "dbtr.models.lit_module.DbtrLitModule"
    OmegaConf.to_container(cfg.model.head, resolve=True)


@pytest.mark.parametrize("model", MODELS)
def test_model_config_builds_head(model):
    cfg = _compose("train.yaml", [f"model={model}"])
    head = DualBranchHead(6, 32, **OmegaConf.to_container(cfg.model.head))
    training_free = model.startswith(("zsclip", "calip"))
    learns_prompts = cfg.model.get("prompts") is not None  # the contexts are built with CLIP (tests/test_prompts.py)
    assert (head.trainable or learns_prompts) is not training_free


@pytest.mark.parametrize("debug", ["fdr", "limit"])
def test_debug_presets_compose(debug):
    cfg = _compose("train.yaml", [f"debug={debug}"])
    assert "trainer" in cfg


def test_eval_config_requires_checkpoint():
    cfg = _compose("eval.yaml", [])
    assert OmegaConf.is_missing(cfg, "ckpt_path")
    assert cfg.clip.name_or_path is None


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_for_eval(experiment):
    cfg = _compose("eval.yaml", [f"experiment={experiment}", "ckpt_path=x.ckpt"])
    assert "_target_" in cfg.data


@pytest.mark.parametrize("data", ["voc2007_captions", "coco2014_captions", "nuswide_captions"])
def test_caption_corpus_configs_compose(data):
    cfg = _compose("train.yaml", [f"data={data}", "paths.data_dir=/data"])
    corpus = OmegaConf.to_container(cfg.data.corpus, resolve=True)
    assert corpus["sources"][0]["path"].startswith("/data/") and corpus["class_sentences"] == 9
    assert (corpus["max_per_class"] == 1000) == (data == "nuswide_captions")


@pytest.mark.parametrize("overrides", [[f"data={d}"] for d in DATA] + [[f"experiment={e}"] for e in EXPERIMENTS])
def test_taidpt_composes_with_every_data_config_and_experiment(overrides):
    cfg = _compose("train.yaml", [*overrides, "model=taidpt", "paths.data_dir=/data"])
    model = OmegaConf.to_container(cfg.model, resolve=False)
    assert model["prompts"] == {"n_ctx": 16, "ctx_init": None, "ctx_std": 0.02, "class_specific": False}
    assert model["head"]["global_residual"] is model["head"]["local_residual"] is False and model["head"]["pfa"] == "none"
    image_trained = any(x in o for o in overrides for x in ("_partial", "_seen_unseen"))  # those protocols train with ASL
    assert model["optimizer"]["name"] == "sgd" and model["loss"] == ("asl" if image_trained else "ranking")
