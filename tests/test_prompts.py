"""TaI-DPT's double-grained prompt learning (``model=taidpt``): exactness against ``encode_text``, gradients
reaching only the contexts, eval-time caching, strict checkpoints, and a dbtr-train -> dbtr-eval round
trip."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from dbtr.data.captions import encode_caption_features
from dbtr.data.datamodule import TextToImageDataModule
from dbtr.models.heads import DualBranchHead
from dbtr.models.prompts import PromptLearner
from dbtr.system.lit_module import CheckpointMismatchError, DbtrLitModule

NAMES = ["red", "purple box", "diningtable"]  # multi-token names of different lengths; VOC's devkit spelling
PHRASE = "a photo of a"


def _ref(encoder, context: str, names=NAMES):
    """Independent reference: the ordinary text path on the literal prompt string."""
    prompt = {"diningtable": "dining table"}
    return encoder.encode_texts([f"{context} {prompt.get(n, n)}." for n in names])


def _n_tokens(encoder, text: str) -> int:
    return len(encoder.tokenizer(text)["input_ids"]) - 2


def test_prompts_initialised_from_a_real_prompt_reproduce_encode_text(encoder):
    pl = PromptLearner(encoder, NAMES, n_ctx=_n_tokens(encoder, PHRASE), ctx_init=PHRASE)
    t_g, t_l = pl(encoder)
    ref = _ref(encoder, PHRASE)
    torch.testing.assert_close(t_g, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(t_l, ref, atol=1e-6, rtol=0)


def test_sixteen_token_contexts_set_to_real_tokens_reproduce_encode_text(encoder):
    glob, loc = " ".join([PHRASE] * 4), "a red photo of a blue photo of a green photo of a photo of a"
    assert _n_tokens(encoder, glob) == _n_tokens(encoder, loc) == 16
    pl = PromptLearner(encoder, NAMES)  # random N(0, 0.02^2) init, as TaI-DPT
    with torch.no_grad():
        for ctx, text in ((pl.ctx_global, glob), (pl.ctx_local, loc)):
            ctx.copy_(encoder.embed_tokens(torch.tensor(encoder.tokenizer(text)["input_ids"][1:-1])))
    t_g, t_l = pl(encoder)
    torch.testing.assert_close(t_g, _ref(encoder, glob), atol=1e-6, rtol=0)
    torch.testing.assert_close(t_l, _ref(encoder, loc), atol=1e-6, rtol=0)
    assert not torch.allclose(t_g, t_l, atol=1e-3)


def test_prompt_names_are_written_in_place_of_the_class_names(encoder):
    """TaI-DPT prompts its own class names (VOC's "diningtable" as it is): prompt_names replaces the text."""
    n = _n_tokens(encoder, PHRASE)
    pl = PromptLearner(encoder, NAMES, n_ctx=n, ctx_init=PHRASE, prompt_names={"diningtable": "diningtable"})
    t_g, _ = pl(encoder)
    ref = encoder.encode_texts([f"{PHRASE} red.", f"{PHRASE} purple box.", f"{PHRASE} diningtable."])
    torch.testing.assert_close(t_g, ref, atol=1e-6, rtol=0)
    assert not torch.allclose(t_g[2], _ref(encoder, PHRASE)[2], atol=1e-4)  # not "dining table"


def test_model_prompt_names_reach_t0_and_the_prompts_and_bad_ones_are_refused(encoder):
    model = DbtrLitModule(
        clip={"name_or_path": "unused"},
        class_names=NAMES,
        templates="simple",
        encoder=encoder,
        prompts={"n_ctx": 4, "ctx_init": PHRASE},
        prompt_names={"red": "purple box"},
    )
    model.ensure_class_embeddings()
    t0 = encoder.encode_texts(
        ["a photo of a purple box.", "a photo of a purple box.", "a photo of a dining table."]
    )
    torch.testing.assert_close(model.head.class_embeds, t0, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        model.head.prompts(encoder)[0], _ref(encoder, PHRASE, ["purple box", *NAMES[1:]])
    )
    assert model.hparams["prompt_names"] == {
        "red": "purple box"
    }  # saved: checkpoints rebuild the same prompts
    with pytest.raises(
        ValueError, match=r"model prompt_names: the prompt text of \['red'\] must be a non-empty"
    ):
        DbtrLitModule(
            clip={"name_or_path": "x"}, class_names=NAMES, encoder=encoder, prompt_names={"red": " "}
        )


def test_class_specific_contexts_give_each_class_its_own_prompt(encoder):
    contexts = ["a photo of a", "a red photo of", "of a blue photo"]
    assert {_n_tokens(encoder, c) for c in contexts} == {4}
    pl = PromptLearner(encoder, NAMES, n_ctx=4, class_specific=True)
    assert pl.ctx_global.shape == (3, 4, encoder.model.config.text_config.hidden_size)
    with torch.no_grad():
        for c, text in enumerate(contexts):
            pl.ctx_global[c] = encoder.embed_tokens(torch.tensor(encoder.tokenizer(text)["input_ids"][1:-1]))
    t_g, _ = pl(encoder)
    ref = torch.cat([_ref(encoder, text, [name]) for text, name in zip(contexts, NAMES)])
    torch.testing.assert_close(t_g, ref, atol=1e-6, rtol=0)


def test_random_init_follows_taidpt(encoder):
    torch.manual_seed(0)
    pl = PromptLearner(encoder, NAMES)
    width = encoder.model.config.text_config.hidden_size
    assert pl.ctx_global.shape == pl.ctx_local.shape == (16, width)
    for ctx in (pl.ctx_global, pl.ctx_local):
        assert (
            abs(float(ctx.detach().std()) - 0.02) < 0.002 and abs(float(ctx.detach().mean())) < 0.002
        )  # 1,024 draws
    assert not torch.equal(pl.ctx_global, pl.ctx_local)  # two independent contexts
    assert [n for n, _ in pl.named_parameters()] == ["ctx_global", "ctx_local"]
    assert set(pl.state_dict()) == {"ctx_global", "ctx_local"}  # token ids are rebuilt, not saved


def test_prompt_errors_are_clear(encoder):
    with pytest.raises(ValueError, match="prompts.n_ctx=16"):
        PromptLearner(encoder, NAMES, n_ctx=16, ctx_init=PHRASE)
    with pytest.raises(ValueError, match="more than the text encoder's 32"):
        PromptLearner(encoder, NAMES, n_ctx=28)
    with pytest.raises(ValueError, match="n_ctx must be >= 1"):
        PromptLearner(encoder, NAMES, n_ctx=0)


def test_head_uses_the_given_bases_instead_of_t0():
    g = torch.Generator().manual_seed(0)
    b, n, c, d = 2, 5, 3, 8
    f_g = F.normalize(torch.randn(b, d, generator=g), dim=-1)
    feats = F.normalize(torch.randn(b, n, d, generator=g), dim=-1)
    t_g, t_l = (F.normalize(torch.randn(c, d, generator=g), dim=-1) for _ in range(2))
    head = DualBranchHead(c, d, global_residual=False, local_residual=False, pfa="none")  # T0 never set
    out = head(f_g, feats, None, modality="image", bases=(t_g, t_l))
    z_l = torch.zeros(b, c)
    for i in range(b):
        for k in range(c):
            a = feats[i] @ t_l[k]
            z_l[i, k] = (4.0 * a * torch.softmax(40.0 * a, 0)).sum()
    torch.testing.assert_close(out.logits_global, 4.0 * f_g @ t_g.t())
    torch.testing.assert_close(out.logits_local, z_l)
    torch.testing.assert_close(out.logits, 0.5 * out.logits_global + 0.5 * z_l)
    with pytest.raises(RuntimeError, match="class embeddings are not set"):
        head(f_g, feats, None)


# ------------------------------------------------------------------------------------------- Lightning system
def _datamodule(demo_dir, encoder):
    dm = TextToImageDataModule(
        classes=str(demo_dir / "classes.txt"),
        train_captions=str(demo_dir / "captions.jsonl"),
        test_images=str(demo_dir / "images"),
        test_labels=str(demo_dir / "test.jsonl"),
        batch_size=32,
    )
    dm.attach_encoder(encoder)
    dm.setup("fit")
    dm.set_caption_features(encode_caption_features(encoder, dm.captions.texts))
    return dm


def _taidpt(encoder, names, **prompts):
    return DbtrLitModule(
        clip={"name_or_path": "unused"},
        class_names=names,
        templates="simple",
        encoder=encoder,
        head={"global_residual": False, "local_residual": False, "pfa": "none"},
        prompts={"n_ctx": 16, **prompts},
        optimizer={"name": "sgd", "lr": 0.5},
        scheduler={"name": "constant"},
    )


def test_training_updates_only_the_contexts_and_clip_stays_bit_identical(demo_dir, encoder):
    dm = _datamodule(demo_dir, encoder)
    model = _taidpt(encoder, dm.class_names)
    clip_before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    ctx_before = [p.detach().clone() for p in (model.head.prompts.ctx_global, model.head.prompts.ctx_local)]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "head.prompts.ctx_global",
        "head.prompts.ctx_local",
    ]

    batch = next(iter(dm.train_dataloader()))
    out = model.head(
        *model.features(batch)[:3], modality="text", bases=model.branch_bases()
    )  # = training_step
    sum(model.branch_losses(out, batch["labels"]).values()).backward()
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())
    for p in (
        model.head.prompts.ctx_global,
        model.head.prompts.ctx_local,
    ):  # both branches' losses reach theirs
        assert p.grad is not None and p.grad.abs().sum() > 0
    model.zero_grad()

    model.ensure_class_embeddings()  # T0 (one template per class) is built once, before fit
    passes = []
    handle = encoder.model.text_model.encoder.register_forward_hook(
        lambda m, i, o: passes.append(o.last_hidden_state.shape[0])
    )
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, datamodule=dm)
    handle.remove()
    assert (
        passes == [2 * len(dm.class_names)] * 2
    )  # one pass per step for C classes x 2 prompt sets, no caption
    assert encoder.model.training is False
    for k, v in encoder.model.state_dict().items():
        assert torch.equal(v, clip_before[k]), k
    for before, p in zip(ctx_before, (model.head.prompts.ctx_global, model.head.prompts.ctx_local)):
        assert not torch.equal(before, p.detach())


def test_eval_class_embeddings_are_computed_once_per_context_version(demo_dir, encoder):
    model = _taidpt(encoder, ["red", "green", "blue"]).eval()
    model.ensure_class_embeddings()
    batch = {
        "image_embeds": F.normalize(torch.randn(4, encoder.embed_dim), dim=-1),
        "patch_embeds": F.normalize(torch.randn(4, 9, encoder.embed_dim), dim=-1),
    }
    passes = []
    handle = encoder.model.text_model.encoder.register_forward_hook(lambda *a: passes.append(1))
    with torch.no_grad():
        first = model(batch)
        again = model(batch)
        assert len(passes) == 1 and torch.equal(first.logits, again.logits)
        model.head.prompts.ctx_local.add_(
            torch.randn_like(model.head.prompts.ctx_local)
        )  # in place, like a step
        changed = model(batch)
        assert len(passes) == 2
        fresh_g, fresh_l = model.head.prompts(encoder)
    handle.remove()
    assert torch.equal(changed.logits_global, first.logits_global)
    assert not torch.allclose(changed.logits_local, first.logits_local, atol=1e-4)
    torch.testing.assert_close(changed.logits_global, 4.0 * batch["image_embeds"] @ fresh_g.t())
    fresh_local = DualBranchHead(3, encoder.embed_dim, pfa="none")(
        batch["image_embeds"], batch["patch_embeds"], bases=(fresh_g, fresh_l)
    ).logits_local
    torch.testing.assert_close(changed.logits_local, fresh_local)


def test_checkpoint_state_is_the_contexts_and_loads_strictly(encoder):
    names = ["red", "green", "blue"]
    model = _taidpt(encoder, names)
    state = model.state_dict()
    assert set(state) == {"head.prompts.ctx_global", "head.prompts.ctx_local"}
    other = _taidpt(encoder, names)
    other.load_state_dict(state)
    assert torch.equal(other.head.prompts.ctx_local, model.head.prompts.ctx_local)
    with pytest.raises(CheckpointMismatchError, match="missing \\['head.prompts.ctx_local'\\]"):
        other.load_state_dict({"head.prompts.ctx_global": state["head.prompts.ctx_global"]})
    with pytest.raises(
        CheckpointMismatchError, match="prompt context 'head.prompts.ctx_global' has shape \\(8, "
    ):
        _taidpt(encoder, names).load_state_dict(_taidpt(encoder, names, n_ctx=8).state_dict())
    with pytest.raises(CheckpointMismatchError, match="unexpected \\['head.prompts"):
        DbtrLitModule(
            clip={"name_or_path": "unused"}, class_names=names, templates="simple", encoder=encoder
        ).load_state_dict(state)


# ---------------------------------------------------------------------------- through the console scripts
@pytest.fixture(scope="module")
def taidpt_run(demo_dir, tmp_path_factory, cli):
    run = tmp_path_factory.mktemp("taidpt") / "run"
    cli(
        "dbtr-train",
        "experiment=tiny_full",
        "model=taidpt",
        f"paths.tiny_dir={demo_dir}",
        f"hydra.run.dir={run}",
        "trainer.max_epochs=1",
        "model.scheduler.warmup_epochs=0",
        "model.optimizer.lr=0.05",
        cwd=run.parent,
    )
    return run


def test_train_writes_metrics_and_a_contexts_only_checkpoint(taidpt_run):
    metrics = json.loads((taidpt_run / "metrics.json").read_text())
    assert (
        metrics["config"]["model"]["prompts"]["n_ctx"] == 16
        and metrics["config"]["model"]["optimizer"]["name"] == "sgd"
    )
    for key in ("test/mAP", "test/mAP_global", "test/mAP_local"):
        assert 0.0 < metrics["test"][key] <= 100.0
    ckpt = torch.load(metrics["checkpoint"], map_location="cpu", weights_only=True)
    assert set(ckpt["state_dict"]) == {"head.prompts.ctx_global", "head.prompts.ctx_local"}
    assert ckpt["state_dict"]["head.prompts.ctx_global"].shape == (16, 64)  # the tiny text tower's width
    assert ckpt["hyper_parameters"]["prompts"]["ctx_std"] == 0.02


def test_reloaded_checkpoint_and_dbtr_eval_reproduce_the_test_map(taidpt_run, demo_dir, tmp_path, cli):
    from dbtr.data.images import ClipImageTransform, ImageDataset, read_image_jsonl
    from dbtr.metrics import mean_average_precision

    metrics = json.loads((taidpt_run / "metrics.json").read_text())
    model = DbtrLitModule.load_from_checkpoint(metrics["checkpoint"]).eval()
    records = read_image_jsonl(demo_dir / "images", demo_dir / "test.jsonl", model.class_names)
    ds = ImageDataset(records, ClipImageTransform(32))
    with torch.no_grad():
        scores = model(torch.stack([ds[i]["pixel_values"] for i in range(len(ds))])).logits
    assert mean_average_precision(scores, records.labels) == pytest.approx(
        metrics["test"]["test/mAP"], abs=1e-6
    )

    cli(
        "dbtr-eval",
        f"ckpt_path={metrics['checkpoint']}",
        "data=tiny",
        f"paths.tiny_dir={demo_dir}",
        f"hydra.run.dir={tmp_path / 'eval'}",
        cwd=tmp_path,
    )
    got = json.loads((tmp_path / "eval" / "metrics.json").read_text())["test"]
    assert got["test/mAP"] == pytest.approx(metrics["test"]["test/mAP"], abs=1e-9)
    assert got["test/per_class_AP"] == metrics["test"]["test/per_class_AP"]


def test_a_new_class_name_is_scored_with_the_learned_shared_prompts(taidpt_run, demo_dir):
    from dbtr.data.images import load_image
    from dbtr.system.checkpoint import load_checkpoint

    ckpt = json.loads((taidpt_run / "metrics.json").read_text())["checkpoint"]
    trained = load_checkpoint(ckpt)
    opened = load_checkpoint(ckpt, classes=[trained.class_names[1], "zebra"])
    assert opened.new_classes == ["zebra"] and "learned prompt contexts" in opened.new_class_rule
    # TaI-DPT has no attention across classes, so a one-class model with the same contexts is the reference
    hp = torch.load(ckpt, map_location="cpu", weights_only=True)
    alone = DbtrLitModule(
        **{**hp["hyper_parameters"], "class_names": ["zebra"], "evaluation": {"top_k": [1]}},
        encoder=trained.model.encoder,
    )
    alone.load_state_dict(hp["state_dict"])
    alone.eval()
    images = [load_image(demo_dir / "images" / f"test_{i:04d}.png") for i in range(6)]
    got, want = opened.score(images)[0], trained.score(images)[0]
    pixels = torch.stack([trained.transform(im) for im in images])
    with torch.no_grad():
        torch.testing.assert_close(got[:, 1], alone(pixels).logits[:, 0])
        fresh = _taidpt(
            trained.model.encoder, ["zebra", "red", "green"]
        )  # random contexts: the learned ones matter
        assert not torch.allclose(got[:, 1], fresh.eval()(pixels).logits[:, 0])
    torch.testing.assert_close(got[:, 0], want[:, 1])


def test_class_specific_prompts_refuse_new_names_but_allow_a_subset(encoder, clip_dir, tmp_path):
    from dbtr.system.checkpoint import load_checkpoint

    names = ["red", "green", "blue"]
    model = _taidpt(encoder, names, class_specific=True)
    with torch.no_grad():
        model.head.prompts.ctx_global.normal_()
    path = tmp_path / "csc.ckpt"
    hp = {**model.hparams, "clip": {"name_or_path": str(clip_dir)}}
    torch.save({"hyper_parameters": hp, "state_dict": model.state_dict()}, path)
    with pytest.raises(
        ValueError, match=r"one prompt context per training class.*new class names \['zebra'\]"
    ):
        load_checkpoint(path, classes=["red", "zebra"])
    subset = load_checkpoint(path, classes=["blue", "red"]).model.head.prompts
    torch.testing.assert_close(subset.ctx_global, model.head.prompts.ctx_global[[2, 0]])
    torch.testing.assert_close(subset.ctx_local, model.head.prompts.ctx_local[[2, 0]])
