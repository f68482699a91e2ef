"""SigLIP (HF ``SiglipModel``; SigLIP 2's fixed-resolution checkpoints too) behind :class:`ClipEncoder`'s
interface. ``ClipEncoder.from_pretrained`` comes here for a folder or hub id whose config.json says
``model_type="siglip"``. SigLIP has no CLS token and no projection matrices: its image tower ends in a
multi-head attention-pooling ("MAP") head, its text tower in a linear ``head`` on the last position, and the
joint space is the vision width (embed dim = hidden size). Choices (docs/siglip.md says why):

- global image: the MAP head's output, exactly ``get_image_features(...).pooler_output``;
- dense (``clip.dense=maskclip``, the only mode): the head's value path on every patch, MaskCLIP-style. The
  head computes ``g = f(a)`` with ``a = out_proj(softmax(q_probe k^T) V)`` and ``f(a) = a + MLP(LN(a))``; the
  probe's attention is replaced by identity, so patch ``i`` gets ``f(out_proj(v_proj(x_i)))``: exactly the
  head run on that patch alone (one key: its attention weight is 1). ``f`` is kept: it is the head's map
  into the joint space (the part CLIP's post-LN + projection play, which MaskCLIP keeps), and the probe has
  no residual of its own to drop (the attention output is not added to the probe). Before ``f``, the pooled
  ``a`` is, head by head, the attention average of the per-patch values, so ``f`` takes both to the same
  space; without it the patches would sit where no pooled feature is ever compared with text;
- text global: ``get_text_features(input_ids).pooler_output``, the head on the LAST position of the sequence
  padded to exactly ``max_position_embeddings`` (64) tokens, with no attention mask: how SigLIP was trained
  (big_vision attends over the pad tokens). ``eot_index`` is therefore the last position, and ``max_length``
  cannot be changed;
- text local (the caption token features): ``head(final_layer_norm(h_t))`` at the tokenizer's real tokens
  (its attention mask: the words and ``</s>``), from the same unmasked pass; the pad positions, the pooled one
  included when it is a pad, carry no word and are left out;
- SigLIP's ``logit_scale`` / ``logit_bias`` are exposed (:attr:`logit_scale`, :attr:`logit_bias`,
  :meth:`probabilities`) but not used: dbtr scores are cosine x its head's own scale, and
  ``sigmoid(s cos + b)`` is increasing in ``cos`` with one ``(s, b)`` for every image and class, so every
  ranking and AP is the same.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dbtr.models.clip import ClipEncoder, ImageEmbeddings, InvalidClipFolder, TextEmbeddings
from dbtr.utils.errors import ConfigError

SIGLIP_DENSE_MODES: tuple[str, ...] = ("maskclip",)
# SiglipImageProcessor's normalisation (SigLIP and SigLIP 2): pixels in [-1, 1].
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def head_value_path(head: nn.Module, x: Tensor) -> Tensor:
    """The MAP head with the probe's attention replaced by identity, on every token of ``x`` (B, N, W):
    ``f(out_proj(v_proj(x)))`` with the head's own ``f(a) = a + MLP(LN(a))``."""
    attn = head.attention
    width = attn.embed_dim
    if attn._qkv_same_embed_dim:
        w_v, b_v = attn.in_proj_weight[2 * width :], attn.in_proj_bias[2 * width :]
    else:
        w_v, b_v = attn.v_proj_weight, attn.in_proj_bias[2 * width :]
    a = attn.out_proj(F.linear(x, w_v, b_v))
    return a + head.mlp(head.layernorm(a))


class SiglipClipEncoder(ClipEncoder):
    """A frozen ``transformers.SiglipModel`` with the CLIP encoder's methods and properties."""

    def __init__(self, model, tokenizer, dense: str = "maskclip", max_length: int | None = None):
        nn.Module.__init__(self)
        if dense not in SIGLIP_DENSE_MODES:
            raise ConfigError(
                f"clip.dense={dense} is not available for a SigLIP model; choose one of: "
                f"{', '.join(SIGLIP_DENSE_MODES)} (the attention-pooling head's value path: SigLIP has no "
                f"CLS token, and the naive / clearclip modes recompute a CLIP's last block for it)"
            )
        cfg = model.config
        if not cfg.vision_config.vision_use_head:
            raise InvalidClipFolder(
                "this SigLIP vision tower has no attention-pooling head (vision_use_head=false): it has no "
                "image embedding in the joint space; use a SigLIP image-text checkpoint"
            )
        if cfg.text_config.projection_size != cfg.vision_config.hidden_size:
            raise InvalidClipFolder(
                f"this SigLIP's text head maps to {cfg.text_config.projection_size} dimensions but its image "
                f"embedding has {cfg.vision_config.hidden_size}: not an image-text pair"
            )
        length = int(cfg.text_config.max_position_embeddings)
        if max_length not in (None, length):
            raise ConfigError(
                f"clip.max_length={max_length} does not fit a SigLIP text tower: it pools the last position "
                f"of a sequence padded to exactly {length} tokens (how it was trained), so clip.max_length "
                f"must be null or {length}"
            )
        self.model = model.requires_grad_(False).eval()
        tokenizer.padding_side = "right"  # the pooled last position is a pad unless the text fills it
        self.tokenizer = tokenizer
        self.dense = dense
        self.max_length = length
        self.eos_token_id = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad_token_id = self.eos_token_id if pad is None else pad

    # ------------------------------------------------------------ identity and sizes
    def projection_weights(self) -> tuple[Tensor, Tensor]:
        """The last linear maps into the joint space: the text head and the MAP head's MLP output."""
        m = self.model
        return m.text_model.head.weight, m.vision_model.head.mlp.fc2.weight

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.vision_config.hidden_size)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def image_mean(self) -> tuple[float, ...]:
        """The normalisation SigLIP was trained with (CLIP encoders have none of these: CLIP's is the data
        default); the datamodules take it when ``data`` sets no mean / std."""
        return SIGLIP_MEAN

    @property
    def image_std(self) -> tuple[float, ...]:
        return SIGLIP_STD

    @property
    def logit_scale(self) -> float:
        """SigLIP's trained temperature ``exp(logit_scale)`` (dbtr's scores do not use it: module doc)."""
        return float(self.model.logit_scale.exp())

    @property
    def logit_bias(self) -> float:
        return float(self.model.logit_bias)

    def probabilities(self, cosine: Tensor) -> Tensor:
        """SigLIP's image-text match probability ``sigmoid(scale * cos + bias)`` of cosine similarities."""
        return torch.sigmoid(cosine * self.logit_scale + self.logit_bias)

    def tower_identity(self, tower: str) -> tuple[list[str], list[Tensor]]:
        cfg, m = self.model.config, self.model
        if tower == "text":
            tm = m.text_model
            strings = [
                "siglip-text",
                cfg.text_config.to_json_string(use_diff=False),
                self._tokenizer_digest(),
            ]
            return strings, [
                tm.embeddings.token_embedding.weight,
                tm.final_layer_norm.weight,
                tm.head.weight,
                tm.encoder.layers[0].self_attn.q_proj.weight,
                tm.encoder.layers[-1].mlp.fc2.weight,
            ]
        vm = m.vision_model
        strings = ["siglip-image", cfg.vision_config.to_json_string(use_diff=False), f"dense={self.dense}"]
        return strings, [
            vm.embeddings.patch_embedding.weight,
            vm.embeddings.position_embedding.weight,
            vm.encoder.layers[0].self_attn.q_proj.weight,
            vm.encoder.layers[-1].mlp.fc2.weight,
            vm.post_layernorm.weight,
            vm.head.probe,
            vm.head.attention.in_proj_weight,
            vm.head.mlp.fc2.weight,
        ]

    def _tokenizer_digest(self) -> str:
        """The sentencepiece model's bytes (the text cache key also hashes a fast tokenizer's own spec)."""
        sp = getattr(self.tokenizer, "sp_model", None)
        if sp is None:
            return "no-sentencepiece"
        return "spiece=" + hashlib.sha256(sp.serialized_model_proto()).hexdigest()[:16]

    # ----------------------------------------------------------------------- text
    def eot_index(self, input_ids: Tensor) -> Tensor:
        """The pooled position: SigLIP pools the last position of its fully padded sequence."""
        if input_ids.shape[-1] != self.max_length:
            raise ValueError(
                f"SigLIP token sequences must be padded to exactly {self.max_length} tokens, got "
                f"{input_ids.shape[-1]} (tokenize with padding='max_length')"
            )
        return torch.full(
            input_ids.shape[:-1], self.max_length - 1, dtype=torch.long, device=input_ids.device
        )

    def pad_ids(self, rows) -> Tensor:
        """Rows padded with the pad token to the full length, as the tokenizer pads (the tower is not causal:
        every pad position changes the pooled feature)."""
        return torch.tensor([list(r) + [self.pad_token_id] * (self.max_length - len(r)) for r in rows])

    @torch.no_grad()
    def encode_text(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, normalize: bool = True
    ) -> TextEmbeddings:
        """Pooled (last position) and per-token features; ``attention_mask`` only marks the real tokens for
        the local branch: the tower attends over the pads, as it was trained."""
        input_ids = input_ids.to(self.device)
        self.eot_index(input_ids)  # the length check
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        tm = self.model.text_model
        tokens = tm.head(tm(input_ids=input_ids).last_hidden_state)  # last_hidden_state is after the final LN
        pooled = tokens[:, -1]
        if normalize:
            tokens, pooled = F.normalize(tokens, dim=-1), F.normalize(pooled, dim=-1)
        return TextEmbeddings(pooled, tokens, attention_mask.bool())

    def encode_text_embeddings(
        self, inputs_embeds: Tensor, eot_index: Tensor, normalize: bool = True
    ) -> Tensor:
        """``SiglipTextModel.forward`` from input token embeddings (positions, unmasked bidirectional encoder,
        final LN, head at ``eot_index``), differentiable with respect to ``inputs_embeds``."""
        tm = self.model.text_model
        hidden = tm.encoder(inputs_embeds=tm.embeddings(inputs_embeds=inputs_embeds)).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        out = tm.head(tm.final_layer_norm(hidden[rows, eot_index.to(hidden.device)]))
        return F.normalize(out, dim=-1) if normalize else out

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        return self.model.text_model.embeddings.token_embedding(input_ids.to(self.device))

    # ---------------------------------------------------------------------- image
    @torch.no_grad()
    def encode_image(
        self, pixel_values: Tensor, normalize: bool = True, dense: str | None = None
    ) -> ImageEmbeddings:
        """The MAP head's output (exactly ``get_image_features``) and its value path on every patch, from one
        pass of the trunk."""
        dense = dense or self.dense
        if dense not in SIGLIP_DENSE_MODES:
            raise ValueError(f"dense must be one of {SIGLIP_DENSE_MODES} for a SigLIP model, got {dense!r}")
        vm = self.model.vision_model
        pixel_values = pixel_values.to(device=self.device, dtype=vm.post_layernorm.weight.dtype)
        interpolate = tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size)
        x = vm.embeddings(pixel_values, interpolate_pos_encoding=interpolate)
        x = vm.post_layernorm(vm.encoder(inputs_embeds=x).last_hidden_state)
        image, patches = vm.head(x), head_value_path(vm.head, x)
        if normalize:
            image, patches = F.normalize(image, dim=-1), F.normalize(patches, dim=-1)
        return ImageEmbeddings(image, patches)
