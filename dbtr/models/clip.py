"""Frozen HF CLIP wrapper: text EOT + token embeddings, image global + dense patch embeddings.

Everything the heads consume comes out of this one module, projected into the joint space and
L2-normalised. Dense image features follow docs/method.md §2.2: the last vision block is recomputed
for the patch tokens (``naive`` = standard block, ``maskclip`` = identity attention, ``clearclip`` =
q-q attention, ``sclip`` = q-q plus k-k attention with the residual and the MLP kept, ``naclip`` = k-k
attention plus a Gaussian neighbourhood prior; maskclip, clearclip and naclip drop the residual and the
MLP), while the global embedding is the untouched CLS path. Running the first L-1 blocks once and
splitting only the last block keeps the cost of global + dense features at about one ordinary image
forward.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dbtr.utils.errors import ConfigError, UserError

log = logging.getLogger(__name__)

DenseMode = Literal["naive", "maskclip", "clearclip", "sclip", "naclip", "tagclip"]
DENSE_MODES: tuple[str, ...] = ("naive", "maskclip", "clearclip", "sclip", "naclip", "tagclip")
# NACLIP's default std of its neighbourhood prior, in patches (sinahmr/NACLIP naclip.py, gaussian_std=5.).
NACLIP_STD = 5.0
# dense modes whose ImageEmbeddings also carry a patch affinity: ``tagclip`` (TagCLIP, docs/tagclip.md) is the
# standard last block with self-only attention, plus DMAR's affinity from the attention maps of every block
AFFINITY_DENSE_MODES: tuple[str, ...] = ("tagclip",)
# TagCLIP's additive mask on the last block's attention off the diagonal (its clip/clip_model.py): finite, so
# a token still attends a little to the others when its own score is far below theirs
SELF_ONLY_MASK = -100.0


def _check_dense(dense: str) -> None:
    if dense not in DENSE_MODES:
        raise ConfigError(
            f"clip.dense={dense} is not a dense mode of a ViT CLIP; choose one of: {', '.join(DENSE_MODES)} "
            f"(standard last block / identity attention / q-q attention / q-q + k-k attention / k-k "
            f"attention with a neighbourhood prior / self-only attention with residual and MLP (TagCLIP), "
            f"docs/method.md §2.2)"
        )


class ClipWeightsNotFound(UserError, FileNotFoundError):
    """Raised when a CLIP checkpoint cannot be loaded from a folder or the (offline) hub cache."""


@dataclass
class TextEmbeddings:
    """Projected text features: ``text_embeds`` (B, D) at EOT, ``token_embeds`` (B, L, D), ``attention_mask``
    (B, L)."""

    text_embeds: Tensor
    token_embeds: Tensor
    attention_mask: Tensor


@dataclass
class ImageEmbeddings:
    """Projected image features: ``image_embeds`` (B, D) and ``patch_embeds`` (B, N, D); ``patch_affinity``
    (B, N, N) for the dense modes of ``AFFINITY_DENSE_MODES``, else None."""

    image_embeds: Tensor
    patch_embeds: Tensor
    patch_affinity: Tensor | None = None


def _missing_weights_message(name_or_path: str, err: Exception) -> str:
    if "siglip" in name_or_path.lower():
        model_class, tokenizer_class, example, folder = (
            "SiglipModel",
            "AutoTokenizer",
            "google/siglip-base-patch16-224",
            "weights/siglip-b16",
        )
    else:
        model_class, tokenizer_class, example, folder = (
            "CLIPModel",
            "CLIPTokenizer",
            "openai/clip-vit-base-patch16",
            "weights/clip-b16",
        )
    return (
        f"Could not load CLIP weights from {name_or_path!r}.\n"
        f"  Looked for: a local folder with config.json + model.safetensors (or pytorch_model.bin) and "
        f"tokenizer files, or the hub id {name_or_path!r} in the HF cache "
        f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}).\n"
        f"  To fix: download once on a machine with internet, e.g.\n"
        f'      python -c "from transformers import {model_class}, {tokenizer_class} as T; '
        f"{model_class}.from_pretrained('{example}').save_pretrained('{folder}'); "
        f"T.from_pretrained('{example}').save_pretrained('{folder}')\"\n"
        f"  then copy the folder here and pass clip.name_or_path={folder} "
        f"(or set HF_HOME to a populated cache).\n"
        f"  Underlying error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    )


# What CLIPTokenizer reads: the fast tokenizer file, or the BPE vocabulary and its merges.
TOKENIZER_FILES: tuple[tuple[str, ...], ...] = (("tokenizer.json",), ("vocab.json", "merges.txt"))
# What SigLIP's tokenizers read: SiglipTokenizer's sentencepiece model, or a fast one (SigLIP 2's Gemma).
SIGLIP_TOKENIZER_FILES: tuple[tuple[str, ...], ...] = (("spiece.model",), ("tokenizer.json",))


@dataclass(frozen=True)
class Backbone:
    """A dual encoder ClipEncoder drives, by its config.json ``model_type``."""

    model_class: str  # the transformers class that loads it
    tokenizer_files: tuple[tuple[str, ...], ...]  # one of these groups must be in a local folder
    byte_level: bool  # a byte-level BPE tokenizer (a token per byte: at least MIN_TOKENIZER_VOCAB)


# config.json's model_type must be one of these (another folder, e.g. a BERT, would otherwise load as a
# randomly initialised full-size CLIP). SigLIP 2's fixed-resolution checkpoints are model_type "siglip" too.
BACKBONES: dict[str, Backbone] = {
    "clip": Backbone("CLIPModel", TOKENIZER_FILES, byte_level=True),
    "siglip": Backbone("SiglipModel", SIGLIP_TOKENIZER_FILES, byte_level=False),
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(BACKBONES)
# A byte-level BPE has a token per byte; fewer means a placeholder (HF builds a 2-token one out of nothing).
MIN_TOKENIZER_VOCAB = 256
_PROBE_SENTENCE = "a photo of a dog."


class InvalidClipFolder(UserError):
    """A CLIP folder or hub id with the wrong model, incomplete or damaged weights, or no usable tokenizer."""


def _folder_listing(path: Path) -> str:
    names = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if not names:
        return "nothing"
    return ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")


def _check_model_type(name_or_path: str, source: str, path: Path | None) -> str:
    from transformers import PretrainedConfig

    if path is not None and not (path / "config.json").is_file():  # HF reads an absent one as an empty config
        raise ClipWeightsNotFound(
            _missing_weights_message(
                name_or_path,
                FileNotFoundError(f"no config.json in {path} (it holds {_folder_listing(path)})"),
            )
        )
    try:
        config, _ = PretrainedConfig.get_config_dict(source)
    except (OSError, ValueError) as err:
        raise ClipWeightsNotFound(_missing_weights_message(name_or_path, err)) from None
    model_type = config.get("model_type")
    if model_type == "siglip2":
        raise InvalidClipFolder(
            f"{name_or_path} is a SigLIP 2 NaFlex model (model_type='siglip2', Siglip2Model): its images "
            f"are patchified at their own aspect ratio, which dbtr's square preprocessing and fixed patch "
            f"grid do not provide; use a fixed-resolution SigLIP 2 checkpoint (model_type='siglip', e.g. "
            f"google/siglip2-base-patch16-224) or a SigLIP one (clip=siglip_b16)"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InvalidClipFolder(
            f"{name_or_path} is not a CLIP model: its config.json has model_type={model_type!r}, and dbtr "
            f"needs one of {', '.join(map(repr, SUPPORTED_MODEL_TYPES))}; pass clip.name_or_path=<a folder "
            f"saved by CLIPModel.save_pretrained> (or a CLIP hub id such as openai/clip-vit-base-patch16)"
        )
    return model_type


def _check_tokenizer_files(name_or_path: str, path: Path, model_type: str = "clip") -> None:
    groups = BACKBONES[model_type].tokenizer_files
    if any(all((path / f).is_file() for f in group) for group in groups):
        return
    needed = " or ".join(" + ".join(group) for group in groups)
    example = (
        "AutoTokenizer.from_pretrained('google/siglip-base-patch16-224')"
        if model_type == "siglip"
        else "CLIPTokenizer.from_pretrained('openai/clip-vit-base-patch16')"
    )
    raise InvalidClipFolder(
        f"{name_or_path} has no tokenizer files: it needs {needed} (it holds {_folder_listing(path)}); save "
        f"the matching tokenizer into it, e.g. {example}.save_pretrained('{name_or_path}')"
    )


def _check_tokenizer(name_or_path: str, tokenizer, vocab_size: int, byte_level: bool = True) -> None:
    """A tokenizer that loaded but cannot be this model's: too small, larger than the embedding table (ids out
    of range), far smaller than it (another model's), or one that maps plain English to the unknown token."""
    size = len(tokenizer)
    problem = None
    if byte_level and size < MIN_TOKENIZER_VOCAB:
        problem = f"its vocabulary has {size} tokens (a CLIP tokenizer has at least {MIN_TOKENIZER_VOCAB})"
    elif not vocab_size // 2 <= size <= vocab_size:
        problem = f"its vocabulary has {size} tokens but the text model embeds {vocab_size}"
    else:
        ids = tokenizer(_PROBE_SENTENCE)["input_ids"]
        specials = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
        words = [i for i in ids if i not in specials]
        unk = tokenizer.unk_token_id
        if not words or (unk is not None and all(i == unk for i in words)):
            problem = f"it tokenizes {_PROBE_SENTENCE!r} to unknown tokens only ({ids})"
    if problem:
        raise InvalidClipFolder(
            f"the tokenizer of {name_or_path} does not fit its CLIP model: {problem}; put the tokenizer the "
            f"model was trained with into the folder (tokenizer.json, or vocab.json + merges.txt)"
        )


def _weights_files(path: Path) -> str:
    files = sorted(
        p.name
        for p in path.glob("*")
        if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")
    )
    return ", ".join(files) if files else "its weights"


def _check_loading_info(name_or_path: str, info: dict) -> None:
    """Every parameter must come from the file: transformers initialises missing ones at random (a warning)"""
    for kind, what in (
        ("missing_keys", "lack"),
        ("unexpected_keys", "hold the unknown"),
        ("mismatched_keys", "have a wrongly shaped"),
    ):
        keys = sorted(info.get(kind) or ())
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise InvalidClipFolder(
                f"the weights in {name_or_path} do not match its CLIP config: they {what} weight "
                f"{keys[0]!r}{more}, so part of the model would be random; use the folder exactly as "
                f"save_pretrained wrote it"
            )


def _load_weights(
    name_or_path: str, source: str, path: Path | None, kwargs: dict, model_class: str = "CLIPModel"
):
    """``<model_class>.from_pretrained`` that refuses absent, damaged or incomplete weights."""
    import pickle

    import transformers
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its missing/unexpected-keys table: we raise one message instead
    try:
        model, info = getattr(transformers, model_class).from_pretrained(
            source, output_loading_info=True, **kwargs
        )
    except torch.OutOfMemoryError:
        raise
    except OSError as err:  # HF raises OSError / EnvironmentError subclasses when files are absent
        raise ClipWeightsNotFound(_missing_weights_message(name_or_path, err)) from None
    except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as err:
        where = _weights_files(path) if path is not None else "its weights"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InvalidClipFolder(
            f"cannot load the CLIP weights in {name_or_path} ({where}): truncated, damaged or not matching "
            f"its config.json ({type(err).__name__}: {first}); copy or download the folder again"
        ) from err
    finally:
        hf_logging.set_verbosity(verbosity)
    _check_loading_info(name_or_path, info)
    return model


def load_clip(
    name_or_path: str, torch_dtype: torch.dtype | None = None, attn_implementation: str | None = None
):
    """Load ``(CLIPModel, CLIPTokenizer)`` (or ``(SiglipModel, its tokenizer)``) from a local folder or a hub
    id, with one clear error when missing, when the folder is not a CLIP, and when its weights or tokenizer
    are incomplete (never a half-random model)."""
    path = Path(name_or_path).expanduser()
    # A string that is not an existing folder is a hub id only if it has the "org/name" shape;
    # anything else (./x, /abs/x, a bare typo) is a local path that does not exist.
    is_hub_id = (
        not path.exists()
        and not name_or_path.startswith((".", "~", "/"))
        and re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path) is not None
    )
    if not is_hub_id and not path.is_dir():
        raise ClipWeightsNotFound(
            _missing_weights_message(name_or_path, FileNotFoundError(f"no folder at {path.resolve()}"))
        )
    source = name_or_path if is_hub_id else str(path)
    model_type = _check_model_type(name_or_path, source, None if is_hub_id else path)
    backbone = BACKBONES[model_type]
    if not is_hub_id:
        _check_tokenizer_files(name_or_path, path, model_type)
    kwargs = {}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = _load_weights(name_or_path, source, None if is_hub_id else path, kwargs, backbone.model_class)
    tokenizer = _load_tokenizer(name_or_path, source, model_type)
    _check_tokenizer(
        name_or_path, tokenizer, int(model.config.text_config.vocab_size), byte_level=backbone.byte_level
    )
    return model, tokenizer


def _load_tokenizer(name_or_path: str, source: str, model_type: str):
    """CLIP: ``CLIPTokenizer``. SigLIP: the class its tokenizer_config.json names (``SiglipTokenizer``, a
    sentencepiece model; SigLIP 2's Gemma tokenizer)."""
    from transformers import AutoTokenizer, CLIPTokenizer

    loader = CLIPTokenizer if model_type == "clip" else AutoTokenizer
    try:
        return loader.from_pretrained(source)
    except ImportError as err:  # SiglipTokenizer needs sentencepiece and protobuf
        why = " ".join(str(err).split()).split(". ")[0]
        raise InvalidClipFolder(
            f"the tokenizer of {name_or_path} needs a package that is not installed ({why}); install "
            f"dbtr's SigLIP extra: pip install 'dbtr[siglip]' (sentencepiece, protobuf)"
        ) from None
    except (OSError, ValueError) as err:
        raise ClipWeightsNotFound(_missing_weights_message(name_or_path, err)) from None


class ClipEncoder(nn.Module):
    """A frozen ``transformers.CLIPModel`` plus tokenizer, exposing the embeddings dbtr needs.

    :param model: a ``CLIPModel`` (its weights are frozen and it is kept in eval mode).
    :param tokenizer: the matching ``CLIPTokenizer``.
    :param dense: how patch embeddings are computed from the last block (see module docstring).
    :param max_length: token length for captions and prompts (CLIP uses 77).
    """

    def __init__(self, model, tokenizer, dense: DenseMode = "clearclip", max_length: int | None = None):
        super().__init__()
        _check_dense(dense)
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.dense = dense
        pos = model.config.text_config.max_position_embeddings
        self.max_length = min(max_length or pos, pos)
        # OpenAI hub configs carry a legacy eos_token_id=2 ("#"); the tokenizer knows the real EOT id (49407).
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None)
        if self.eos_token_id is None:
            self.eos_token_id = model.config.text_config.eos_token_id

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        dense: DenseMode | None = None,
        max_length: int | None = None,
        torch_dtype: torch.dtype | None = torch.float32,
        attn_implementation: str | None = None,
        resnet: dict | None = None,
    ) -> ClipEncoder:
        """Load from a folder or hub id. float32 by default: weights saved in fp16 (like the shipped toy CLIP)
        would otherwise stay fp16, which is slow and lossy on CPUs. ``dense=None``: the backbone's default
        (``clearclip`` for a ViT CLIP, ``maskclip`` for a ResNet or SigLIP, their only mode).

        A weights *file* (OpenAI's ``RN50.pt``, an open_clip ``.bin`` / ``.safetensors``) loads an OpenAI CLIP
        ResNet instead (:class:`dbtr.models.clip_resnet.ResNetClipEncoder`, same interface); ``resnet`` holds
        its options (``bpe_path``, ``positional``, ``arch``). A SigLIP folder or hub id (config.json
        ``model_type="siglip"``) loads :class:`dbtr.models.clip_siglip.SiglipClipEncoder`."""
        from dbtr.models.clip_resnet import ResNetClipEncoder, is_weights_file

        modes = {} if dense is None else {"dense": dense}
        if is_weights_file(name_or_path):
            return ResNetClipEncoder.from_file(
                name_or_path, max_length=max_length, torch_dtype=torch_dtype, **modes, **(resnet or {})
            )
        model, tokenizer = load_clip(
            name_or_path, torch_dtype=torch_dtype, attn_implementation=attn_implementation
        )
        if model.config.model_type == "siglip":
            from dbtr.models.clip_siglip import SiglipClipEncoder

            return SiglipClipEncoder(model, tokenizer, max_length=max_length, **modes)
        return cls(model, tokenizer, max_length=max_length, **modes)

    def train(self, mode: bool = True) -> ClipEncoder:  # CLIP stays in eval mode whatever the system does
        super().train(False)
        return self

    def fingerprint(self) -> str:
        """Identity of the weights the residuals live on: a hash of both projection matrices."""
        import hashlib

        h = hashlib.sha256()
        for w in self.projection_weights():
            h.update(w.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def projection_weights(self) -> tuple[Tensor, Tensor]:
        """The text and image projections into the joint space (what ``fingerprint`` hashes)."""
        return self.model.text_projection.weight, self.model.visual_projection.weight

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def learned_logit_scale(self) -> float:
        """CLIP's own similarity scale exp(logit_scale) (100 for OpenAI's released models)."""
        return float(self.model.logit_scale.exp())

    @property
    def has_patch_affinity(self) -> bool:
        """Whether ``encode_image`` returns a patch affinity (TagCLIP's DMAR, ``dense=tagclip``)."""
        return self.dense in AFFINITY_DENSE_MODES

    @property
    def text_width(self) -> int:
        """Width of the text tower's token embeddings (what learned prompt contexts are made of)."""
        return int(self.model.config.text_config.hidden_size)

    @property
    def dense_stride(self) -> int:
        """Input pixels per dense feature along a side (the patch size; 32 for a ResNet)."""
        return int(self.model.config.vision_config.patch_size)

    @property
    def device(self) -> torch.device:
        return self.model.visual_projection.weight.device

    def tower_identity(self, tower: str) -> tuple[list[str], list[Tensor]]:
        """The config strings and weight tensors the cached features of ``tower`` (``text`` / ``image``)
        depend on; dbtr.data.feature_cache hashes them into its cache keys."""
        cfg, m = self.model.config, self.model
        if tower == "text":
            tm = m.text_model
            strings = [cfg.text_config.to_json_string(use_diff=False), str(cfg.projection_dim)]
            return strings, [
                tm.embeddings.token_embedding.weight,
                tm.final_layer_norm.weight,
                m.text_projection.weight,
                tm.encoder.layers[0].self_attn.q_proj.weight,
                tm.encoder.layers[-1].mlp.fc2.weight,
            ]
        vm = m.vision_model
        vision = cfg.vision_config.to_json_string(use_diff=False)
        dense = f"naclip(std={NACLIP_STD})" if self.dense == "naclip" else self.dense
        strings = [vision, f"proj={cfg.projection_dim}|dense={dense}"]
        return strings, [
            vm.embeddings.patch_embedding.weight,
            vm.embeddings.position_embedding.weight,
            vm.encoder.layers[0].self_attn.q_proj.weight,
            vm.encoder.layers[-1].mlp.fc2.weight,
            vm.post_layernorm.weight,
            m.visual_projection.weight,
        ]

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Pad to ``max_length`` and truncate, as CLIP was trained (TaI-DPT feeds 77-token captions)."""
        out = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def eot_index(self, input_ids: Tensor) -> Tensor:
        """First EOS position: OpenAI checkpoints pad with the EOS id, so argmax-of-id would be wrong."""
        is_eos = input_ids == self.eos_token_id
        if not bool(is_eos.any(-1).all()):
            raise ValueError(
                "every token sequence must contain the EOS token "
                "(was the text tokenized by this CLIP tokenizer?)"
            )
        return is_eos.int().argmax(-1)

    @torch.no_grad()
    def encode_text(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, normalize: bool = True
    ) -> TextEmbeddings:
        """EOT ("global") and per-token ("local") projected embeddings of token sequences."""
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        # CLIP's text transformer is causal, so tokens after EOT cannot alter earlier ones; the mask only
        # marks which positions are real tokens for the local branch (SOT and EOT included, as TaI-DPT).
        hidden = self.model.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        tokens = self.model.text_projection(hidden)
        eot = tokens[torch.arange(tokens.shape[0], device=tokens.device), self.eot_index(input_ids)]
        if normalize:
            tokens, eot = F.normalize(tokens, dim=-1), F.normalize(eot, dim=-1)
        return TextEmbeddings(eot, tokens, attention_mask.bool())

    def pad_ids(self, rows: Sequence[Sequence[int]]) -> Tensor:
        """Token rows (special tokens included) as one (B, L) batch for ``encode_text_embeddings``. CLIP's
        text tower is causal, so rows are padded with EOS to the longest only: nothing after a row's EOT can
        change its EOT feature."""
        length = max(len(r) for r in rows)
        return torch.tensor([list(r) + [self.eos_token_id] * (length - len(r)) for r in rows])

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """Input token embeddings (B, L, W) of the text tower, before positions are added."""
        return self.model.text_model.embeddings.token_embedding(input_ids.to(self.device))

    def encode_text_embeddings(
        self, inputs_embeds: Tensor, eot_index: Tensor, normalize: bool = True
    ) -> Tensor:
        """EOT embeddings (B, D) of sequences given as input token embeddings (B, L, W): prompt learning.

        The same computation as ``encode_text``'s global output (``CLIPTextModel.forward`` of transformers 5:
        positions added, causal mask, final layer norm, projection), but differentiable with respect to
        ``inputs_embeds``. No padding mask is needed: the model is causal, so positions after ``eot_index``
        cannot change it, and callers may cut sequences just after their EOT.
        """
        from transformers.masking_utils import create_causal_mask

        tm = self.model.text_model
        hidden = tm.embeddings(inputs_embeds=inputs_embeds)
        mask = create_causal_mask(config=tm.config, inputs_embeds=hidden, attention_mask=None, cache=None)
        hidden = tm.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        eot = hidden[torch.arange(hidden.shape[0], device=hidden.device), eot_index.to(hidden.device)]
        out = self.model.text_projection(tm.final_layer_norm(eot))
        return F.normalize(out, dim=-1) if normalize else out

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, normalize: bool = True) -> Tensor:
        """Global (EOT) embeddings of raw strings, batched."""
        chunks = []
        for start in range(0, len(texts), batch_size):
            tok = self.tokenize(texts[start : start + batch_size])
            chunks.append(self.encode_text(**tok, normalize=normalize).text_embeds)
        return torch.cat(chunks) if chunks else torch.empty(0, self.embed_dim)

    # ----------------------------------------------------------------- image
    @torch.no_grad()
    def encode_image(
        self, pixel_values: Tensor, normalize: bool = True, dense: DenseMode | None = None
    ) -> ImageEmbeddings:
        """Global CLS embedding (exactly ``get_image_features``) and dense patch embeddings, in one pass."""
        dense = dense or self.dense
        _check_dense(dense)
        vm = self.model.vision_model
        pixel_values = pixel_values.to(device=self.device, dtype=self.model.visual_projection.weight.dtype)
        interpolate = tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size)
        x = vm.pre_layrnorm(vm.embeddings(pixel_values, interpolate_pos_encoding=interpolate))
        # the patch grid (rows, columns) of the stride-p patch convolution, row-major in x[:, 1:]
        grid = (pixel_values.shape[-2] // self.dense_stride, pixel_values.shape[-1] // self.dense_stride)
        layers = vm.encoder.layers
        maps = [] if dense in AFFINITY_DENSE_MODES else None  # every block's attention, for DMAR
        for layer in layers[:-1]:
            if maps is not None:
                maps.append(_attention_map(layer, x))
            x = _layer_output(layer(x, None))
        cls_token, patches = _last_block(layers[-1], x, dense, grid)
        image = self.model.visual_projection(vm.post_layernorm(cls_token))
        patch = self.model.visual_projection(vm.post_layernorm(patches))
        if normalize:
            image, patch = F.normalize(image, dim=-1), F.normalize(patch, dim=-1)
        if maps is None:
            return ImageEmbeddings(image, patch)
        from dbtr.models.tagclip import dmar_affinity

        return ImageEmbeddings(image, patch, dmar_affinity([*maps, _attention_map(layers[-1], x)]))


def _layer_output(out) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def _heads(t: Tensor, num_heads: int) -> Tensor:
    b, n, w = t.shape
    return t.view(b, n, num_heads, w // num_heads).transpose(1, 2)  # (B, H, N, d)


def _merge_heads(t: Tensor) -> Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def neighbourhood_prior(grid: tuple[int, int], std: float = NACLIP_STD) -> Tensor:
    """NACLIP's additive attention prior over [CLS, patches] (N+1, N+1) for a row-major ``grid`` of patches.

    Between patches it is the unnormalised Gaussian exp(-|p_i - p_j|^2 / (2 std^2)) of their grid distance
    (1 on the diagonal, as NACLIP's window); the CLS row and column are 0, so CLS is attended to (and
    attends) on key similarity alone.
    """
    rows, cols = grid
    r = torch.arange(rows, dtype=torch.float64).repeat_interleave(cols)
    c = torch.arange(cols, dtype=torch.float64).repeat(rows)
    dist2 = (r[:, None] - r[None]) ** 2 + (c[:, None] - c[None]) ** 2
    return F.pad(torch.exp(-dist2 / (2 * std**2)), (1, 0, 1, 0))


def _last_block(layer: nn.Module, x: Tensor, dense: str, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Return (CLS output of the standard block (B, W), patch outputs under ``dense`` (B, N, W)); ``grid`` is
    the (rows, columns) layout of the N patches (for NACLIP's prior)."""
    attn = layer.self_attn
    y = layer.layer_norm1(x)
    q, k, v = (_heads(proj(y), attn.num_heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    # Standard attention for the CLS query only: the global embedding must equal get_image_features.
    cls_attn = torch.softmax((q[:, :, :1] @ k.transpose(-1, -2)) * attn.scale, dim=-1)
    cls_h = x[:, 0] + attn.out_proj(_merge_heads(cls_attn @ v))[:, 0]
    cls_out = cls_h + layer.mlp(layer.layer_norm2(cls_h))
    if dense == "tagclip":
        return cls_out, _self_only_patches(layer, x, q, k, v)
    if dense == "naive":
        # The untouched block on every token (CALIP's ViT features).
        full = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        h = x + attn.out_proj(_merge_heads(full))
        patches = (h + layer.mlp(layer.layer_norm2(h)))[:, 1:]
    elif dense == "maskclip":
        # Identity attention: each patch keeps its own value; no residual, no MLP (MaskCLIP).
        patches = attn.out_proj(_merge_heads(v))[:, 1:]
    elif dense == "clearclip":
        # q-q attention, no residual, no MLP (ClearCLIP).
        qq = F.scaled_dot_product_attention(q, q, v, scale=attn.scale)
        patches = attn.out_proj(_merge_heads(qq))[:, 1:]
    elif dense == "sclip":
        # Correlative self-attention softmax(q qT s) + softmax(k kT s), not renormalised (rows sum to 2), in
        # the standard block with its residual and MLP (SCLIP; NACLIP's "csa" on its "vanilla" block).
        csa = F.scaled_dot_product_attention(q, q, v, scale=attn.scale)
        csa = csa + F.scaled_dot_product_attention(k, k, v, scale=attn.scale)
        h = x + attn.out_proj(_merge_heads(csa))
        patches = (h + layer.mlp(layer.layer_norm2(h)))[:, 1:]
    elif dense == "naclip":
        # softmax(k kT s + omega) v, no residual, no MLP (NACLIP's "naclip" attention on its "reduced" block).
        if grid[0] * grid[1] != x.shape[1] - 1:
            raise ValueError(f"a {grid[0]}x{grid[1]} patch grid does not hold the {x.shape[1] - 1} patches")
        omega = neighbourhood_prior(grid).to(device=k.device, dtype=k.dtype)
        kk = F.scaled_dot_product_attention(k, k, v, attn_mask=omega, scale=attn.scale)
        patches = attn.out_proj(_merge_heads(kk))[:, 1:]
    else:
        raise ValueError(f"unknown dense mode {dense!r}")  # _check_dense guards the public entry points
    return cls_out, patches


def _self_only_patches(layer: nn.Module, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """TagCLIP's last block on the patch tokens (B, N, W): the standard block, residual and MLP kept, with
    ``(1 - I) * SELF_ONLY_MASK`` added to the attention scores over all N+1 tokens (CLS included)."""
    attn = layer.self_attn
    n = x.shape[1]
    mask = (1.0 - torch.eye(n, device=x.device, dtype=q.dtype)) * SELF_ONLY_MASK
    out = F.scaled_dot_product_attention(q[:, :, 1:], k, v, attn_mask=mask[1:], scale=attn.scale)
    h = x[:, 1:] + attn.out_proj(_merge_heads(out))
    return h + layer.mlp(layer.layer_norm2(h))


def _attention_map(layer: nn.Module, x: Tensor) -> Tensor:
    """The standard attention of ``layer`` on its input ``x``, averaged over heads: (B, N+1, N+1)."""
    attn = layer.self_attn
    y = layer.layer_norm1(x)
    q, k = (_heads(proj(y), attn.num_heads) for proj in (attn.q_proj, attn.k_proj))
    return torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1).mean(1)
