"""Every config composes into what it claims: experiments build their datamodule and head, debug presets
really shorten the run, and no config file restates a value its composition would have without it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dbtr.models.heads import DualBranchHead
from dbtr.models.tagclip import TagClipHead
from dbtr.utils.hydra_utils import CONFIG_DIR

CONF = Path(CONFIG_DIR)
DATA = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml") if p.stem != "from_checkpoint")
PROTOCOLS = sorted(p.stem for p in (CONF / "protocol").glob("*.yaml"))
# groups whose files override other files (a parent in their defaults list, or the entry config's choices)
CHECKED_GROUPS = ("experiment", "protocol", "model", "data", "trainer", "callbacks", "debug")

# what each benchmark experiment builds without touching the disk: datamodule class, classes, training signal
BENCHMARKS = {
    "voc2007_captions": ("VOC2007DataModule", 20, "captions"),
    "coco2014_captions": ("Coco2014DataModule", 80, "captions"),
    "nuswide_captions": ("NusWideDataModule", 81, "captions"),
    "voc2007_partial": ("VOC2007DataModule", 20, "images"),
    "coco2014_partial": ("Coco2014DataModule", 80, "images"),
    "nuswide_partial": ("NusWideDataModule", 81, "images"),
    "coco2014_seen_unseen": ("Coco2014DataModule", 48 + 17, "images"),
    "nuswide_seen_unseen": ("NusWideDataModule", 925 + 81, "images"),
    # TaI-DPT's recipe (tests/test_taidpt_recipe.py checks its values)
    "voc2007_zs": ("VOC2007DataModule", 20, "captions"),
    "coco2014_zs": ("Coco2014DataModule", 80, "captions"),
    "nuswide_zs": ("NusWideDataModule", 81, "captions"),
}


def _compose(name: str, overrides: list[str], conf: Path = CONF):
    with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
        return compose(config_name=name, overrides=overrides, return_hydra_config=True)


def test_there_is_something_to_compose():
    assert EXPERIMENTS and len(MODELS) >= 7 and {"captions", "partial", "seen_unseen"} <= set(PROTOCOLS)
    assert set(BENCHMARKS) <= set(EXPERIMENTS)


# ------------------------------------------------------------------------ experiments build what they claim
def _own(group: str, name: str, conf: Path = CONF) -> dict:
    """The file's own content (its defaults list left out), placed at its package."""
    path = conf / group / f"{name}.yaml"
    body = yaml.safe_load(path.read_text()) or {}
    body.pop("defaults", None)
    return body if "# @package _global_" in path.read_text() else {group: body}


@pytest.mark.parametrize("experiment", sorted(BENCHMARKS))
@pytest.mark.parametrize("entry", ["train.yaml", "eval.yaml"])
def test_benchmark_experiment_builds_its_datamodule_and_head(experiment, entry):
    cfg = _compose(entry, [f"experiment={experiment}"] + ["ckpt_path=x.ckpt"] * (entry == "eval.yaml"))
    cls, num_classes, train_on = BENCHMARKS[experiment]
    dm = instantiate(cfg.data)  # the constructors read no image or annotation file
    assert type(dm).__name__ == cls and dm.num_classes == num_classes and dm.train_on == train_on
    protocol = cfg.hydra.runtime.choices.protocol
    assert experiment.endswith(protocol) or (experiment.endswith("_zs") and protocol == "captions")
    if protocol == "partial":
        assert 0 < dm.label_proportion < 1
    if protocol == "seen_unseen":
        assert dm.train_classes == "seen" and 0 < len(dm.class_subsets["seen"]) < num_classes
    if entry == "eval.yaml":
        assert cfg.hydra.runtime.choices.model == "from_checkpoint"  # the checkpoint's own model, not dbtr's
        return
    assert cfg.model.residual_classes == ("seen" if protocol == "seen_unseen" else None)
    assert cfg.model.loss == ("ranking" if protocol == "captions" else "asl")
    head = DualBranchHead(dm.num_classes, 32, **OmegaConf.to_container(cfg.model.head, resolve=True))
    assert head.trainable and head.num_classes == num_classes
    # every head setting the experiment (or its protocol) states reaches the built head
    claimed = {
        **_own("protocol", protocol).get("model", {}).get("head", {}),
        **_own("experiment", experiment).get("model", {}).get("head", {}),
    }
    for key, value in claimed.items():
        assert getattr(head, key) == value, key


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("entry", ["train.yaml", "eval.yaml"])
def test_experiment_resolves_and_names_its_runs(experiment, entry):
    cfg = _compose(entry, [f"experiment={experiment}", "paths.output_dir=/tmp/out", "ckpt_path=x.ckpt"])
    for node in ("model", "data", "trainer", "clip", "paths"):
        OmegaConf.to_container(cfg[node], resolve=True)
    assert cfg.task_name == experiment  # its runs go to logs/<experiment>/


@pytest.mark.parametrize("model", MODELS)
def test_model_config_builds_head(model):
    cfg = _compose("train.yaml", [f"model={model}"])
    kwargs = OmegaConf.to_container(cfg.model.head)
    if cfg.model.get("head_type") == "tagclip":  # its logit_scale null is CLIP's own, set by the lit module
        head = TagClipHead([f"class{i}" for i in range(6)], 32, **{**kwargs, "logit_scale": 100.0})
    else:
        head = DualBranchHead(6, 32, **kwargs)
    training_free = model.startswith(("zsclip", "calip", "tagclip", "sparc"))
    learns_prompts = (
        cfg.model.get("prompts") is not None
    )  # the contexts are built with CLIP (tests/test_prompts.py)
    assert (head.trainable or learns_prompts) is not training_free


# ------------------------------------------------------------------------------------------- debug presets
def _trainer(overrides: list[str], tmp_path: Path):
    cfg = _compose("train.yaml", [*overrides, f"paths.output_dir={tmp_path}"])
    return cfg, instantiate(cfg.trainer)


def test_debug_presets_shorten_the_run(tmp_path):
    default_cfg, default = _trainer([], tmp_path)
    assert default.max_epochs == 20 and default.limit_train_batches == 1.0 and not default.fast_dev_run
    _, limit = _trainer(["debug=limit"], tmp_path)
    assert limit.max_epochs < default.max_epochs and (
        limit.limit_train_batches,
        limit.limit_val_batches,
        limit.limit_test_batches,
    ) == (3, 2, 2)
    fdr_cfg, fdr = _trainer(["debug=fdr"], tmp_path)
    assert fdr.fast_dev_run and fdr.max_epochs == 1 and fdr.limit_train_batches == fdr.limit_test_batches == 1
    assert default_cfg.callbacks and default_cfg.get(
        "logger"
    )  # the default run writes checkpoints, a CSV log
    assert not fdr_cfg.callbacks and fdr_cfg.get("logger") is None  # the fast dev run writes neither


def test_eval_config_requires_checkpoint():
    cfg = _compose("eval.yaml", [])
    assert OmegaConf.is_missing(cfg, "ckpt_path")
    assert cfg.clip.name_or_path is None


@pytest.mark.parametrize("data", ["voc2007_captions", "coco2014_captions", "nuswide_captions"])
def test_caption_corpus_configs_compose(data):
    cfg = _compose("train.yaml", [f"data={data}", "paths.data_dir=/data"])
    corpus = OmegaConf.to_container(cfg.data.corpus, resolve=True)
    assert corpus["sources"][0]["path"].startswith("/data/") and corpus["class_sentences"] == 9
    assert (corpus["max_per_class"] == 1000) == (data == "nuswide_captions")


@pytest.mark.parametrize(
    "overrides", [[f"data={d}"] for d in DATA] + [[f"experiment={e}"] for e in EXPERIMENTS]
)
def test_taidpt_composes_with_every_data_config_and_experiment(overrides):
    cfg = _compose("train.yaml", [*overrides, "model=taidpt", "paths.data_dir=/data"])
    model = OmegaConf.to_container(cfg.model, resolve=False)
    assert model["prompts"] == {"n_ctx": 16, "ctx_init": None, "ctx_std": 0.02, "class_specific": False}
    assert (
        model["head"]["global_residual"] is model["head"]["local_residual"] is False
        and model["head"]["pfa"] == "none"
    )
    image_trained = cfg.hydra.runtime.choices.protocol in ("partial", "seen_unseen")  # those train with ASL
    assert model["optimizer"]["name"] == "sgd" and model["loss"] == ("asl" if image_trained else "ranking")


# ------------------------------------------------------------------------------ no file restates a default
def _parents(group: str, name: str, conf: Path) -> list[str]:
    """Files of the same group that ``name`` extends, directly or not (``defaults: [dbtr, _self_]``)."""
    defaults = (yaml.safe_load((conf / group / f"{name}.yaml").read_text()) or {}).get("defaults", [])
    direct = [d for d in defaults if isinstance(d, str) and d != "_self_" and not d.startswith("/")]
    return direct + [p for d in direct for p in _parents(group, d, conf)]


def _contexts(group: str, name: str, conf: Path) -> list[list[str]]:
    """The compositions a file takes part in: selected on its own, and (protocols) under each experiment
    using it."""
    contexts = [[f"{group}={name}"]]
    if group == "protocol":
        for exp in sorted(p.stem for p in (conf / "experiment").glob("*.yaml")):
            chosen = _compose("train.yaml", [f"experiment={exp}"], conf).hydra.runtime.choices.protocol
            if chosen is not None and (chosen == name or name in _parents(group, chosen, conf)):
                contexts.append([f"experiment={exp}"])
    return contexts


def _restated(own, base, key: str = "") -> list[str]:
    """Keys of ``own`` whose value ``base`` (the composition without them) already has."""
    if isinstance(own, dict) and isinstance(base, dict):
        if not own:
            return [key]  # an empty mapping merged into a mapping changes nothing
        return [
            k
            for sub, v in own.items()
            if sub in base
            for k in _restated(v, base[sub], f"{key}.{sub}" if key else str(sub))
        ]
    return [key] if own == base else []


def restated_defaults(group: str, name: str, conf: Path) -> list[str]:
    """``group/name.yaml: key = value`` for every key of that file equal to what the composition has without
    the file's own content (its defaults list kept). The file is emptied in ``conf``, a throw-away copy."""
    path = conf / group / f"{name}.yaml"
    text = path.read_text()
    own = _own(group, name, conf)
    if not own.get(group, own):
        return []  # an empty file (model/from_checkpoint.yaml's {}) states nothing
    defaults = (yaml.safe_load(text) or {}).get("defaults")
    found = []
    try:
        path.write_text(
            ("# @package _global_\n" if "# @package _global_" in text else "")
            + (yaml.safe_dump({"defaults": defaults}) if defaults else "")
        )
        for overrides in _contexts(group, name, conf):
            cfg = _compose("train.yaml", overrides, conf)
            base = OmegaConf.to_container(cfg, resolve=False)
            for key in _restated(own, base):
                value = OmegaConf.select(cfg, key)
                found.append(
                    f"{group}/{name}.yaml: {key} = {value!r} restates the value it has without this "
                    f"line (with {' '.join(overrides)})"
                )
    finally:
        path.write_text(text)
    return sorted(set(found))


@pytest.fixture
def conf_copy(tmp_path) -> Path:
    """conf/ without the git-ignored local overrides, to edit freely."""
    conf = Path(shutil.copytree(CONF, tmp_path / "conf", ignore=shutil.ignore_patterns("local")))
    (conf / "local").mkdir()
    return conf


def _group_files(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", CHECKED_GROUPS)
def test_no_config_file_restates_a_default(group, conf_copy):
    found = [line for name in _group_files(group) for line in restated_defaults(group, name, conf_copy)]
    assert not found, "delete these lines (the composition already has these values):\n" + "\n".join(found)


def test_restated_defaults_are_found(conf_copy):
    """The check above can fail: restated lines added to an experiment, a protocol and a model are found."""
    exp = conf_copy / "experiment" / "tiny_zsclip.yaml"
    exp.write_text(exp.read_text() + "trainer:\n  max_epochs: 20\n  min_epochs: 2\n")
    model = conf_copy / "model" / "zsclip_centered.yaml"
    model.write_text(model.read_text() + "  merge_weight: 1.0\n  tau_text: 50.0\n")  # under head:
    protocol = conf_copy / "protocol" / "partial.yaml"
    protocol.write_text(protocol.read_text().replace("data:\n", "data:\n  train_on: images\n"))
    assert [line.split(" = ")[0] for line in restated_defaults("experiment", "tiny_zsclip", conf_copy)] == [
        "experiment/tiny_zsclip.yaml: trainer.max_epochs"
    ]
    assert [line.split(" = ")[0] for line in restated_defaults("model", "zsclip_centered", conf_copy)] == [
        "model/zsclip_centered.yaml: model.head.merge_weight",
        "model/zsclip_centered.yaml: model.head.tau_text",
    ]
    assert {line.split(" = ")[0] for line in restated_defaults("protocol", "partial", conf_copy)} == {
        "protocol/partial.yaml: data.train_on"
    }
