"""The Lightning system: a frozen CLIP encoder + the dual-branch head, trained on captions, tested on images.

It builds the model, scores batches, trains and collects evaluation scores; the numbers are computed by
:func:`dbtr.evaluation.summarise`, the optimizer by :func:`dbtr.system.optim.build_optimizer`, and checkpoints
become models through :func:`dbtr.load_checkpoint` (:mod:`dbtr.system.checkpoint`). Checkpoints hold the
head's residuals and plain hyper-parameters only (no CLIP weights, no pickled objects).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor

from dbtr.evaluation import BRANCHES, EVALUATION_DEFAULTS, headline, summarise
from dbtr.losses import get_loss, split_labels
from dbtr.metrics import RowCollector, ScoreCollector
from dbtr.models.clip import ClipEncoder
from dbtr.models.heads import DualBranchHead, HeadOutput
from dbtr.models.prompts import PromptLearner
from dbtr.models.tagclip import TagClipHead
from dbtr.system.checkpoint import (
    CheckpointMismatchError,
    check_state_dict,
    checkpoint_meta,
    load_companion,
    load_head_init,
)
from dbtr.system.optim import OPTIMIZER_DEFAULTS, SCHEDULER_DEFAULTS, build_optimizer
from dbtr.text.names import validate_class_names, validate_prompt_names
from dbtr.utils.errors import ConfigError
from dbtr.utils.seeding import derive_seed, run_seed
from dbtr.zeroshot.classifier import build_class_embeddings
from dbtr.zeroshot.sparc import SparcScorer, sparc_settings

log = logging.getLogger(__name__)
# Under DDP the evaluation scores are all-gathered before the metrics are computed (ScoreCollector, padding
# repeats dropped), so every process logs the same whole-split value: Lightning's advice to sync_dist them,
# and its warning that DistributedSampler repeats test samples, do not apply here.
warnings.filterwarnings("ignore", message=r".*self\.log\('(val|test)/.*sync_dist=True.*")
warnings.filterwarnings(
    "ignore", message=r"Using `DistributedSampler` with the dataloaders\. During `trainer\.test\(\)`.*"
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# model.head_type: the dual-branch head (every model of the paper's table) or TagCLIP's training-free head
HEAD_TYPES = ("dual", "tagclip")
__all__ = ["CheckpointMismatchError", "DbtrLitModule", "attention_grid", "residual_columns"]


def attention_grid(attention: Tensor) -> Tensor:
    """(B, N, C) spatial attention over N = g * g patches (row-major, as CLIP flattens them)
    -> (B, C, g, g)."""
    b, n, c = attention.shape
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"{n} patch positions do not form a square grid (non-square input images?)")
    return attention.permute(0, 2, 1).reshape(b, c, g, g)


def residual_columns(
    chosen: str | Sequence[str], class_names: Sequence[str], subsets: dict[str, Sequence[str]]
) -> list[int]:
    """Columns of ``model.residual_classes`` (a subset name or a list of names) in ``class_names``."""
    if isinstance(chosen, str):
        if chosen not in subsets:
            raise ConfigError(
                f"model.residual_classes={chosen!r} is not one of the class subsets {sorted(subsets)}"
            )
        chosen = subsets[chosen]
    index = {n: i for i, n in enumerate(class_names)}
    unknown = [n for n in chosen if n not in index]
    if unknown:
        raise ConfigError(f"model.residual_classes names classes that are not in class_names: {unknown[:5]}")
    return [index[n] for n in chosen]


class DbtrLitModule(L.LightningModule):
    """Dual-branch task residuals with parameter-free attention on a frozen CLIP.

    :param clip: ``{"name_or_path", "dense", "max_length", "dtype"}`` of the frozen CLIP.
    :param class_names: the label space, in label-column order.
    :param head: keyword arguments of :class:`~dbtr.models.heads.DualBranchHead` (except classes and dim).
    :param templates: prompt set for T0 (``imagenet`` = 80 templates, ``simple``) or a list of templates.
    :param loss: ``ranking`` | ``asl`` | ``bce``; ``loss_kwargs`` are passed to it.
    :param optimizer: ``{"name": adam|adamw|sgd, "lr", "weight_decay", "momentum"}``.
    :param scheduler: ``{"name": cosine|constant, "warmup_epochs", "warmup_lr"}`` (TaI-DPT: constant warm-up,
        cosine).
    :param evaluation: ``{"difficult": negative|ignore, "top_k": [3], "f1_at": [], "val_subset": null}``
        metric conventions: ``f1_at`` adds the zero-shot literature's F1@k (:func:`dbtr.metrics.f1_at_k`);
        ``val_subset`` computes validation metrics (hence model selection) on one class subset only, e.g.
        ``seen``; ``sparc`` (``enabled: true``) rescores every evaluation split with SPARC
        (:mod:`dbtr.zeroshot.sparc`, docs/sparc.md): ``mAP`` is then SPARC's, ``mAP_base`` the model's own
        and ``mAP_debiased`` SPARC's standardisation alone.
    :param class_subsets: named subsets of ``class_names`` (``{"seen": [...], "unseen": [...]}``); the test
        then also reports ``test/<subset>/mAP`` and F1@k on each (ZSL = unseen; GZSL = all classes).
    :param residual_classes: the classes that learn a residual (a subset name or a list); the others keep T0
        (default: all). With ``head.residual_generator`` every class gets ``g(T0)`` instead.
    :param init_from: a checkpoint whose head tensors initialise this one (e.g. text-trained residuals).
    :param ensemble: ``{"text_ckpt": path, "rate": r}``: also score with that (text-only) model and report
        ``(1 - r) * minmax(text) + r * minmax(this)``, min-max over the whole score matrix (TaI-DPT's
        ensemble).
    :param prompts: ``{"n_ctx", "ctx_init", "ctx_std", "class_specific"}`` of a :class:`PromptLearner`
        (TaI-DPT): learned prompts then give the branches' class embeddings instead of T0; None = no prompt
        learning.
    :param prompt_names: ``{class: text}``: the text a class is prompted with in T0 and in the learned
        prompts, in place of its label name (``data.corpus.prompt_names=vocabulary`` passes the vocabulary's
        first synonyms: TaI-DPT's class names); classes not listed keep their label name.
    :param encoder: an already built :class:`ClipEncoder` (tests, notebooks); not saved in the checkpoint.
    :param head_type: ``dual`` (:class:`DualBranchHead`) or ``tagclip`` (:class:`TagClipHead`, training-free;
        ``head`` then holds its arguments and ``logit_scale: null`` means CLIP's learned one).
    :param dense: the dense mode this model needs (``tagclip``): it replaces ``clip.dense``; None = use
        ``clip.dense``.
    """

    def __init__(
        self,
        clip: dict[str, Any],
        class_names: Sequence[str],
        head: dict[str, Any] | None = None,
        templates: str | Sequence[str] = "imagenet",
        loss: str = "ranking",
        loss_kwargs: dict[str, Any] | None = None,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        evaluation: dict[str, Any] | None = None,
        class_subsets: dict[str, Sequence[str]] | None = None,
        residual_classes: str | Sequence[str] | None = None,
        init_from: str | None = None,
        ensemble: dict[str, Any] | None = None,
        encoder: ClipEncoder | None = None,
        prompts: dict[str, Any] | None = None,
        head_type: str = "dual",
        dense: str | None = None,
        prompt_names: dict[str, str] | None = None,
    ):
        super().__init__()
        class_names = validate_class_names(class_names, source="model class_names")
        prompt_names = validate_prompt_names(prompt_names, source="model prompt_names")
        self.save_hyperparameters(ignore=["encoder"], logger=False)
        clip = dict(clip)
        if clip.get("dtype", "float32") not in _DTYPES:
            raise ConfigError(f"clip.dtype must be one of {sorted(_DTYPES)}, got {clip.get('dtype')!r}")
        if head_type not in HEAD_TYPES:
            raise ConfigError(f"model.head_type must be one of {HEAD_TYPES}, got {head_type!r}")
        if dense is not None:
            _check_model_dense(dense, clip, encoder)
        if encoder is None:
            encoder = ClipEncoder.from_pretrained(
                clip["name_or_path"],
                dense=dense or clip.get("dense", "clearclip"),
                max_length=clip.get("max_length"),
                torch_dtype=_DTYPES[clip.get("dtype", "float32")],
                attn_implementation=clip.get("attn_implementation"),
                resnet=clip.get("resnet"),
            )
        self.encoder = encoder
        self.class_names = list(class_names)
        self.prompt_names = prompt_names
        if head_type == "tagclip":
            if prompts is not None:
                raise ConfigError(
                    "model.prompts (learned prompts) cannot be used with the training-free TagCLIP head"
                )
            kwargs = dict(head or {})
            if kwargs.get("logit_scale") is None:
                kwargs["logit_scale"] = encoder.learned_logit_scale
            self.head = TagClipHead(class_names, encoder.embed_dim, prompt_names=prompt_names, **kwargs)
        else:
            prompt_learner = (
                None
                if prompts is None
                else PromptLearner(encoder, class_names, prompt_names=prompt_names, **prompts)
            )
            self.head = DualBranchHead(
                len(class_names), encoder.embed_dim, prompts=prompt_learner, **(head or {})
            )
        self._bases_cache: tuple[tuple, tuple[Tensor, Tensor]] | None = None
        self.loss_fn = get_loss(loss)
        self.loss_kwargs = dict(loss_kwargs or {})
        self.optimizer_cfg = {**OPTIMIZER_DEFAULTS, **(optimizer or {})}
        self.scheduler_cfg = {**SCHEDULER_DEFAULTS, **(scheduler or {})}
        self.eval_cfg = {**EVALUATION_DEFAULTS, **(evaluation or {})}
        too_big = [k for k in self.eval_cfg["top_k"] if not 1 <= int(k) <= len(class_names)]
        if too_big:
            raise ConfigError(
                f"evaluation.top_k {too_big} must lie in [1, {len(class_names)}] (the number of classes)"
            )
        self.class_subsets = self._subset_columns(class_subsets or {})
        if self.eval_cfg["val_subset"] is not None and self.eval_cfg["val_subset"] not in self.class_subsets:
            raise ConfigError(
                f"evaluation.val_subset={self.eval_cfg['val_subset']!r} is not one of the class subsets "
                f"{sorted(self.class_subsets)}"
            )
        if residual_classes is not None:
            learned = torch.zeros(len(class_names), dtype=torch.bool)
            learned[residual_columns(residual_classes, self.class_names, class_subsets or {})] = True
            self.head.set_residual_classes(learned)
        self.init_from = init_from
        self.ensemble_cfg = dict(ensemble or {})
        self.text_model: DbtrLitModule | None = None
        if self.ensemble_cfg.get("text_ckpt"):
            rate = float(self.ensemble_cfg.get("rate", 0.9))
            if not 0.0 <= rate <= 1.0:
                raise ConfigError(f"model.ensemble.rate must be in [0, 1], got {rate}")
        self.templates = templates
        self.collectors = torch.nn.ModuleDict(
            {f"{stage}_{b}": ScoreCollector() for stage in ("val", "test") for b in (*BRANCHES, "text")}
        )
        settings = sparc_settings(self.eval_cfg.get("sparc"))
        self.sparc = None if settings is None else SparcScorer(settings, self.class_names, self.prompt_names)
        if self.sparc is not None:  # SPARC needs the evaluated images' global embeddings
            self.collectors.update({f"{stage}_embeds": RowCollector() for stage in ("val", "test")})
        self.run_info: dict[
            str, Any
        ] = {}  # what made this run (choices, overrides, seed): saved in checkpoints
        self.results: dict[str, dict[str, Any]] = {}
        # the last epoch's merged (scores, labels) per stage, for plots (PR curves) drawn after the epoch
        self.eval_scores: dict[str, tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ set-up
    def _subset_columns(self, subsets: dict[str, Sequence[str]]) -> dict[str, list[int]]:
        index = {n: i for i, n in enumerate(self.class_names)}
        out = {}
        for name, names in subsets.items():
            unknown = [n for n in names if n not in index]
            if unknown:
                raise ConfigError(
                    f"class subset {name!r} names classes that are not in class_names: {unknown[:5]}"
                )
            out[str(name)] = [index[n] for n in names]
        return out

    def load_companions(self, stage: str) -> None:
        """Initialise the head from ``init_from`` (at the start of a fresh fit only: never over trained or
        resumed weights) and load the ensemble's text-only model (both through
        :mod:`dbtr.system.checkpoint`)."""
        resuming = self._trainer is not None and self.trainer.ckpt_path is not None
        if self.init_from and stage == "fit" and not resuming:
            load_head_init(self.head, self.init_from, self.class_names, self.encoder)
        if self.ensemble_cfg.get("text_ckpt") and self.text_model is None:
            text = load_companion(self.ensemble_cfg["text_ckpt"], self.encoder, self.class_names)
            object.__setattr__(self, "text_model", text)  # not a submodule: never saved, never optimised

    def ensure_class_embeddings(self) -> None:
        """Build T0 from the frozen text encoder once per class list (cheap to redo, so never saved)."""
        if not bool(self.head.class_embeds_ready):
            # TagCLIP's head also softmaxes against its background words (embedded after the classes)
            names = [*self.class_names, *getattr(self.head, "background_names", ())]
            t0 = build_class_embeddings(self.encoder, names, self.templates, prompt_names=self.prompt_names)
            self.head.set_class_embeddings(t0.to(self.head.class_embeds.device))

    def setup(self, stage: str) -> None:
        self.ensure_class_embeddings()
        self.load_companions(stage)
        if self.sparc is not None:
            self.sparc.check_sources(self._caption_labels())  # fail now, not after training

    def _caption_labels(self):
        """A function returning the datamodule's training-caption labels (SPARC's co-occurrence), or None."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not getattr(dm, "has_captions", False):
            return None
        return lambda: dm.load_captions().labels

    def branch_bases(self) -> tuple[Tensor, Tensor] | None:
        """The learned prompts' (T_g, T_l), or None (T0). Recomputed with gradients while grad is enabled (a
        training step: C x 2 prompts through the text tower); otherwise computed once per context version."""
        prompts = self.head.prompts
        if prompts is None:
            return None
        if torch.is_grad_enabled():
            return prompts(self.encoder)
        key = prompts.version()
        if self._bases_cache is None or self._bases_cache[0] != key:
            self._bases_cache = (key, prompts(self.encoder))
        return self._bases_cache[1]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record what the residuals depend on beyond hparams, so loading can refuse a silent mismatch."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        checkpoint["dbtr"] = checkpoint_meta(self.encoder, dm, self.run_info)

    def state_dict(self, *args, **kwargs):
        # The frozen CLIP is rebuilt from clip.name_or_path; keeping it out makes checkpoints
        # a few hundred kB.
        full = super().state_dict(*args, **kwargs)
        return type(full)(
            (k, v)
            for k, v in full.items()
            if not k.startswith("encoder.") and not k.startswith("collectors.")
        )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Strict on the head (missing or mis-shaped residuals raise a clear error), silent on CLIP keys."""
        expected = dict(self.state_dict())
        state_dict = {
            k: v
            for k, v in state_dict.items()
            if not k.startswith("encoder.") and not k.startswith("collectors.")
        }
        check_state_dict(state_dict, expected, len(self.class_names), self.encoder, strict)
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        result.missing_keys[:] = [
            k for k in result.missing_keys if k in expected
        ]  # CLIP keys are never stored
        return result

    # --------------------------------------------------------------- inference
    def features(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None, str, Tensor | None]:
        """(global, local, mask, modality, patch affinity or None) from cached features, token ids or
        pixels."""
        if "image_embeds" in batch:
            return batch["image_embeds"], batch["patch_embeds"], None, "image", batch.get("patch_affinity")
        if "pixel_values" in batch:
            out = self.encoder.encode_image(batch["pixel_values"])
            return out.image_embeds, out.patch_embeds, None, "image", out.patch_affinity
        if "text_embeds" in batch:
            return batch["text_embeds"], batch["token_embeds"], batch["attention_mask"], "text", None
        out = self.encoder.encode_text(batch["input_ids"], batch["attention_mask"])
        return out.text_embeds, out.token_embeds, out.attention_mask, "text", None

    def _head_extras(self, affinity: Tensor | None) -> dict[str, Tensor | None]:
        """The patch affinity for a head that reads it (TagCLIP's), nothing for the others."""
        return {"affinity": affinity} if getattr(self.head, "consumes_affinity", False) else {}

    def score(self, batch: dict[str, Tensor]) -> HeadOutput:
        """The head's output on a batch (features from the batch or computed by the frozen CLIP)."""
        g, loc, mask, modality, affinity = self.features(batch)
        return self.head(
            g, loc, mask, modality=modality, bases=self.branch_bases(), **self._head_extras(affinity)
        )

    def forward(self, batch: dict[str, Tensor] | Tensor) -> HeadOutput:
        """Score a batch: a dict with ``pixel_values`` (or caption features / ids), or a pixel tensor."""
        if isinstance(batch, Tensor):
            batch = {"pixel_values": batch}
        self.ensure_class_embeddings()
        return self.score(batch)

    @torch.no_grad()
    def attention_maps(self, pixel_values: Tensor) -> Tensor:
        """(B, C, g, g): the local branch's spatial attention of every class over the g x g patch grid.

        The head's own spatial softmax (``DualBranchHead.local_attention``), so each map sums to 1.
        """
        self.ensure_class_embeddings()
        out = self.encoder.encode_image(pixel_values)
        extras = self._head_extras(out.patch_affinity)
        return attention_grid(
            self.head.local_attention(out.patch_embeds, bases=self.branch_bases(), **extras)
        )

    # ---------------------------------------------------------------- training
    def branch_losses(self, out: HeadOutput, labels: Tensor) -> dict[str, Tensor]:
        targets, known = split_labels(labels, signed=True)  # dbtr label matrices are {1, 0 unknown, -1}
        losses = {"global": self.loss_fn(out.logits_global, targets, known, **self.loss_kwargs)}
        if out.logits_local is not None:
            losses["local"] = self.loss_fn(out.logits_local, targets, known, **self.loss_kwargs)
        return losses

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Checkpoints do not hold the global RNG: seed each step from its restored position, so a resumed run
        # draws the same feature noise as an uninterrupted one (and each DDP process its own).
        torch.manual_seed(
            derive_seed("train-step", run_seed(), self.global_step, batch_idx, self.global_rank)
        )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self.score(batch)
        losses = self.branch_losses(out, batch["labels"])
        loss = sum(losses.values())
        bs = batch["labels"].shape[0]
        self.log(
            "train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=bs, sync_dist=True
        )
        for name, value in losses.items():
            self.log(f"train/loss_{name}", value, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        return loss

    # -------------------------------------------------------------- evaluation
    def _eval_step(self, stage: str, batch: dict[str, Tensor]) -> None:
        self.ensure_class_embeddings()
        g, loc, mask, modality, affinity = self.features(batch)
        out = self.head(
            g, loc, mask, modality=modality, bases=self.branch_bases(), **self._head_extras(affinity)
        )
        labels, idx = batch["labels"], batch.get("index")
        if self.text_model is not None:
            text = self.text_model
            text.head.to(g.device)
            if not bool(text.head.class_embeds_ready):
                text.head.set_class_embeddings(self.head.class_embeds)
            self.collectors[f"{stage}_text"].update(
                text.head(g, loc, mask, modality=modality, bases=text.branch_bases()).logits, labels, idx
            )
        if self.sparc is not None:
            self.sparc.prepare(self.encoder, self._caption_labels())  # once: on the evaluation device
            self.collectors[f"{stage}_embeds"].update(g, idx)
        self.collectors[f"{stage}_merged"].update(out.logits, labels, idx)
        self.collectors[f"{stage}_global"].update(out.logits_global, labels, idx)
        if out.logits_local is not None:
            self.collectors[f"{stage}_local"].update(out.logits_local, labels, idx)

    def _eval_epoch_end(self, stage: str) -> dict[str, Any]:
        collected = {}
        for branch in (*BRANCHES, "text"):
            collector = self.collectors[f"{stage}_{branch}"]
            if collector.update_count:
                collected[branch] = collector.compute()
                collector.reset()
        if self.sparc is not None and "merged" in collected:
            collected = self._with_sparc(collected, stage)
        result, merged = summarise(
            collected,
            stage,
            self.eval_cfg,
            self.class_names,
            self.class_subsets,
            float(self.ensemble_cfg.get("rate", 0.9)),
            object_areas=self._object_areas(stage),
        )
        if merged is not None:
            self.eval_scores[stage] = merged
        for key, value in headline(result).items():
            self.log(key, value, prog_bar=key.endswith("/mAP"), sync_dist=False)
        self.results[stage] = result
        return result

    def _with_sparc(self, collected: dict[str, tuple[Tensor, Tensor]], stage: str) -> dict:
        """SPARC's scores become ``merged``; the model's own are kept as ``base``, the standardised ones as
        ``debiased``."""
        embeds = self.collectors[f"{stage}_embeds"]
        images = embeds.compute()
        embeds.reset()
        base, labels = collected.pop("merged")
        scores, debiased = self.sparc(base, images)
        own = {"merged": (scores, labels), "base": (base, labels), "debiased": (debiased, labels)}
        return {**own, **collected}

    def _object_areas(self, stage: str):
        """The test images' per-class object areas when their labels carry boxes (for the per-size mAPs)."""
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if stage != "test" or not hasattr(datamodule, "object_areas"):
            return None
        return datamodule.object_areas("test")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self(batch).logits

    # --------------------------------------------------------------- optimizer
    def configure_optimizers(self):
        params = [p for p in self.head.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(
                "this head has no learnable residual (both residuals off): evaluate it with train=false"
            )
        total = int(self.trainer.estimated_stepping_batches)
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches):
            batches = len(self.trainer.datamodule.train_dataloader()) if self.trainer.datamodule else total
        steps_per_epoch = max(1, math.ceil(batches / self.trainer.accumulate_grad_batches))
        return build_optimizer(params, self.optimizer_cfg, self.scheduler_cfg, total, steps_per_epoch)


def _check_model_dense(dense: str, clip: dict[str, Any], encoder: ClipEncoder | None) -> None:
    """``model.dense`` (a model's own dense mode) must be one the CLIP can compute."""
    from dbtr.models.clip import DENSE_MODES
    from dbtr.models.clip_resnet import RESNET_DENSE_MODES, ResNetClipEncoder, is_weights_file

    resnet = isinstance(encoder, ResNetClipEncoder) or (
        encoder is None and is_weights_file(str(clip.get("name_or_path") or ""))
    )
    if resnet and dense not in RESNET_DENSE_MODES:
        raise ConfigError(
            f"this model needs model.dense={dense}, a ViT dense mode (the last transformer block and its "
            f"attention maps), but clip.name_or_path={clip.get('name_or_path')} is a ResNet CLIP (its dense "
            f"modes: {', '.join(RESNET_DENSE_MODES)}); use a ViT CLIP, e.g. clip=vit_b16"
        )
    if dense not in DENSE_MODES:
        raise ConfigError(f"model.dense must be null or one of {DENSE_MODES}, got {dense!r}")
    if encoder is not None and encoder.dense != dense:
        raise ConfigError(
            f"this model needs model.dense={dense}, but the encoder it was given computes "
            f"dense={encoder.dense}; build the encoder with dense={dense!r}"
        )
