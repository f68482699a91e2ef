"""In-process checks of the Lightning system: cached training runs no text encoder, losses per branch."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch

from dbtr.data.captions import encode_caption_features
from dbtr.data.datamodule import TextToImageDataModule
from dbtr.losses import ranking_loss
from dbtr.system.lit_module import CheckpointMismatchError, DbtrLitModule


def _datamodule(demo_dir):
    return TextToImageDataModule(
        classes=str(demo_dir / "classes.txt"),
        train_captions=str(demo_dir / "captions.jsonl"),
        test_images=str(demo_dir / "images"),
        test_labels=str(demo_dir / "test.jsonl"),
        batch_size=32,
    )


def _model(encoder, dm, scheduler=None, **head):
    return DbtrLitModule(
        clip={"name_or_path": "unused"},
        class_names=dm.class_names,
        head=head,
        templates="simple",
        encoder=encoder,
        scheduler=scheduler or {"warmup_epochs": 0},
    )


def test_cached_training_runs_no_text_encoder_forward(demo_dir, encoder):
    dm = _datamodule(demo_dir)
    model = _model(encoder, dm)
    dm.attach_encoder(encoder)
    dm.setup("fit")
    dm.set_caption_features(encode_caption_features(encoder, dm.captions.texts))
    model.ensure_class_embeddings()
    calls = []
    handle = encoder.model.text_model.register_forward_hook(lambda *a: calls.append(1))
    before = model.head.global_classifier.residual.detach().clone()
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(model, datamodule=dm)
    handle.remove()
    assert calls == []
    assert not torch.equal(before, model.head.global_classifier.residual.detach())


def test_loss_is_sum_of_branch_ranking_losses(demo_dir, encoder):
    dm = _datamodule(demo_dir)
    model = _model(encoder, dm, pfa="none")
    model.ensure_class_embeddings()
    texts = ["a red box", "a blue ball and a green box"]
    labels = torch.tensor([[1, -1, -1, -1, -1, -1], [-1, 1, 1, -1, -1, -1]])
    out = model({**encoder.tokenize(texts)})
    losses = model.branch_losses(out, labels)
    t = (labels == 1).float()
    torch.testing.assert_close(losses["global"], ranking_loss(out.logits_global, t))
    torch.testing.assert_close(losses["local"], ranking_loss(out.logits_local, t))


def test_unknown_labels_are_masked_in_training(demo_dir, encoder):
    dm = _datamodule(demo_dir)
    model = _model(encoder, dm, pfa="none", use_local=False, merge_weight=1.0, local_residual=False)
    model.ensure_class_embeddings()
    out = model(encoder.tokenize(["a red box"]))
    full = model.branch_losses(out, torch.tensor([[1, -1, -1, -1, -1, -1]]))["global"]
    partial = model.branch_losses(out, torch.tensor([[1, 0, 0, 0, 0, -1]]))["global"]
    assert float(partial) < float(full)
    torch.testing.assert_close(
        partial, ranking_loss(out.logits_global[:, [0, 5]], torch.tensor([[1.0, 0.0]]))
    )


def test_state_dict_mismatch_is_a_clear_error(demo_dir, encoder):
    dm = _datamodule(demo_dir)
    model = _model(encoder, dm)
    bad = {
        "head.global_classifier.residual": torch.zeros(4, 32),
        "head.local_classifier.residual": torch.zeros(6, 32),
    }
    with pytest.raises(CheckpointMismatchError, match="trained with 4 classes"):
        model.load_state_dict(bad)
    with pytest.raises(CheckpointMismatchError, match="missing"):
        model.load_state_dict({"head.global_classifier.residual": torch.zeros(6, 32)})
    # CLIP keys are never required
    model.load_state_dict({k: torch.ones_like(v) for k, v in model.state_dict().items()})
    assert float(model.head.local_classifier.residual.sum()) == 6 * 32


def test_no_learnable_residual_refuses_to_configure_optimizer(demo_dir, encoder):
    dm = _datamodule(demo_dir)
    model = _model(encoder, dm, global_residual=False, local_residual=False)
    with pytest.raises(RuntimeError, match="train=false"):
        model.configure_optimizers()


def test_bad_evaluation_and_schedule_settings_fail_early(demo_dir, encoder):
    dm = _datamodule(demo_dir)
    with pytest.raises(ValueError, match=r"top_k \[9\] must lie in \[1, 6\]"):
        DbtrLitModule(
            clip={"name_or_path": "x"},
            class_names=dm.class_names,
            evaluation={"top_k": [3, 9]},
            encoder=encoder,
        )
    with pytest.raises(ValueError, match="clip.dtype"):
        DbtrLitModule(
            clip={"name_or_path": "x", "dtype": "float8"}, class_names=dm.class_names, encoder=encoder
        )


def test_warmup_covering_the_whole_run_is_shortened_with_a_notice(demo_dir, encoder, caplog):
    dm = _datamodule(demo_dir)  # 96 captions / batch 32 = 3 steps per epoch
    model = DbtrLitModule(
        clip={"name_or_path": "x"},
        class_names=dm.class_names,
        templates="simple",
        encoder=encoder,
        optimizer={"lr": 1e-2},
        scheduler={"warmup_epochs": 1, "warmup_lr": 1e-4},
    )
    dm.attach_encoder(encoder)
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[Record()],
    )
    with caplog.at_level(logging.WARNING, logger="dbtr"):
        trainer.fit(model, datamodule=dm)
    notices = [r.getMessage() for r in caplog.records if "covers the whole run" in r.getMessage()]
    assert len(notices) == 1 and "shortened to 1 steps" in notices[0] and "warmup_epochs=0" in notices[0]
    assert lrs[0] == pytest.approx(1e-4) and lrs[1] == pytest.approx(1e-2)  # 1 warm-up step, then cosine
    assert trainer.global_step == 3


def test_warmup_then_cosine_schedule(demo_dir, encoder):
    dm = _datamodule(demo_dir)  # 96 captions / batch 32 = 3 steps per epoch
    model = DbtrLitModule(
        clip={"name_or_path": "x"},
        class_names=dm.class_names,
        templates="simple",
        encoder=encoder,
        optimizer={"lr": 1e-2},
        scheduler={"warmup_epochs": 1, "warmup_lr": 1e-4},
    )
    lrs = _fit_learning_rates(model, dm, encoder, epochs=3)
    assert lrs[:3] == pytest.approx([1e-4] * 3)  # constant warm-up for one epoch
    assert lrs[3] == pytest.approx(1e-2)  # cosine starts at the base rate
    assert lrs[3] > lrs[4] > lrs[5] > lrs[-1] > 0


def _fit_learning_rates(model, dm, encoder, epochs: int) -> list[float]:
    """The learning rate at the start of every training batch of a ``epochs``-epoch fit."""
    dm.attach_encoder(encoder)
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[Record()],
    )
    trainer.fit(model, datamodule=dm)
    return lrs


def _dassl_lrs(lr: float, cons_lr: float, warmup: int, max_epoch: int, epochs: int) -> list[float]:
    """Independent reference: the lr of each epoch under Dassl's ConstantWarmupScheduler wrapped around
    torch's CosineAnnealingLR(T_max=max_epoch), stepped once at the end of every epoch (TaI-DPT's
    update_lr)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, float(max_epoch))
    opt.param_groups[0]["lr"], wrapper_epoch, out = cons_lr, 0, []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        if wrapper_epoch >= warmup:
            cosine.step()  # the successor takes over
        else:
            wrapper_epoch += 1
            opt.param_groups[0]["lr"] = cosine.get_last_lr()[0] if wrapper_epoch >= warmup else cons_lr
    return out


def test_dassl_factor_matches_its_scheduler_over_twenty_epochs():
    from dbtr.system.optim import dassl_cosine_factor

    want = _dassl_lrs(1e-4, 1e-5, 1, 20, 20)
    got = [1e-4 * dassl_cosine_factor(e, 20, 1, 0.1) for e in range(20)]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert want[0] == pytest.approx(1e-5) and want[1] == pytest.approx(1e-4)
    assert want[-1] == pytest.approx(1e-4 * 0.5 * (1 + torch.cos(torch.tensor(0.9 * torch.pi)).item()))


def test_per_epoch_schedule_is_dassls(demo_dir, encoder):
    dm = _datamodule(demo_dir)  # 96 captions / batch 32 = 3 steps per epoch
    model = DbtrLitModule(
        clip={"name_or_path": "x"},
        class_names=dm.class_names,
        templates="simple",
        encoder=encoder,
        optimizer={"name": "sgd", "lr": 1e-2},
        scheduler={"warmup_epochs": 1, "warmup_lr": 1e-4, "interval": "epoch"},
    )
    lrs = _fit_learning_rates(model, dm, encoder, epochs=4)
    per_epoch = [lrs[3 * e : 3 * e + 3] for e in range(4)]
    assert all(len(set(steps)) == 1 for steps in per_epoch)  # set once per epoch
    assert [steps[0] for steps in per_epoch] == pytest.approx(_dassl_lrs(1e-2, 1e-4, 1, 4, 4), rel=1e-9)


def test_bad_schedule_interval_is_refused():
    from dbtr.system.optim import build_optimizer

    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="model.scheduler.interval must be one of step, epoch, got 'batch'"):
        build_optimizer(params, None, {"interval": "batch"}, 10, 5)
    with pytest.raises(ValueError, match="warmup_epochs must be a whole number"):
        build_optimizer(params, None, {"interval": "epoch", "warmup_epochs": 0.5}, 10, 5)
