"""OpenAI CLIP ResNets (dbtr.models.openai_clip) behind :class:`~dbtr.models.clip.ClipEncoder`'s interface.

``ClipEncoder.from_pretrained(path)`` comes here when ``path`` is a weights file (OpenAI's ``RN50.pt``, an
open_clip ``.bin`` / ``.safetensors``), not an HF folder or hub id. Features as TaI-DPT's code uses them:

- global: the attention pool's output (``positional=False`` drops its positional embedding, as TaI-DPT's
  trainer does; default: kept, as OpenAI's ``encode_image``);
- dense (``clip.dense=maskclip``, the only mode for ResNets): the attention pool's value path on each
  layer-4 position, ``c_proj(v_proj(x))`` (MaskCLIP's and TaI-DPT's ResNet dense features);
- text: the EOT token after ``ln_final`` and ``text_projection``; the token features are every position
  through the same two steps, as the HF path's ``last_hidden_state`` + projection.

The tokenizer is OpenAI's BPE (:class:`~dbtr.text.openai_bpe.OpenAIBPETokenizer`) on
``bpe_simple_vocab_16e6.txt.gz``: ``clip.resnet.bpe_path``, else that file next to the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from dbtr.models.clip import DENSE_MODES, ClipEncoder, ImageEmbeddings, TextEmbeddings
from dbtr.models.openai_clip import OpenAIClip, load_openai_clip
from dbtr.text.openai_bpe import OpenAIBPETokenizer, TokenizerFileError
from dbtr.utils.errors import ConfigError

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
RESNET_DENSE_MODES = ("maskclip",)


def is_weights_file(name_or_path: str) -> bool:
    return Path(name_or_path).suffix in WEIGHT_SUFFIXES


def find_bpe(weights: Path, bpe_path: str | None) -> Path:
    if bpe_path:
        return Path(bpe_path).expanduser()
    beside = weights.expanduser().parent / BPE_FILE
    if beside.is_file():
        return beside
    raise TokenizerFileError(
        f"no OpenAI BPE vocabulary for {weights}: put {BPE_FILE} next to it or pass "
        f"clip.resnet.bpe_path=<file>; the file ships in OpenAI's clip package (MIT): `pip download "
        f"openai-clip==1.0.1 --no-deps -d . && tar xzf openai-clip-1.0.1.tar.gz "
        f"openai-clip-1.0.1/clip/{BPE_FILE}`"
    )


class ResNetClipEncoder(ClipEncoder):
    """A frozen :class:`~dbtr.models.openai_clip.OpenAIClip` with the HF encoder's methods and properties."""

    def __init__(
        self,
        model: OpenAIClip,
        tokenizer: OpenAIBPETokenizer,
        dense: str = "maskclip",
        max_length: int | None = None,
        positional: bool = True,
    ):
        torch.nn.Module.__init__(self)
        if dense not in RESNET_DENSE_MODES:
            raise ConfigError(
                f"clip.dense={dense} is not available for a ResNet CLIP; choose one of: "
                f"{', '.join(RESNET_DENSE_MODES)} (the attention pool's value path); "
                f"{', '.join(m for m in DENSE_MODES if m not in RESNET_DENSE_MODES)} recompute a ViT's last "
                f"attention block and need a ViT CLIP"
            )
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.dense = dense
        self.positional = positional
        ctx = model.config.context_length
        self.max_length = min(max_length or ctx, ctx)
        self.eos_token_id = tokenizer.eos_token_id
        if len(tokenizer) > model.config.vocab_size:
            raise TokenizerFileError(
                f"the BPE vocabulary {tokenizer.path} has {len(tokenizer)} tokens but the text model embeds "
                f"{model.config.vocab_size}: use the vocabulary the weights were trained with"
            )

    @classmethod
    def from_file(
        cls,
        path: str,
        dense: str = "maskclip",
        max_length: int | None = None,
        torch_dtype: torch.dtype | None = torch.float32,
        bpe_path: str | None = None,
        positional: bool = True,
        arch: str | None = None,
    ) -> ResNetClipEncoder:
        model = load_openai_clip(path, expected=arch, dtype=torch_dtype or torch.float32)
        tokenizer = OpenAIBPETokenizer(
            find_bpe(Path(path), bpe_path), context_length=model.config.context_length
        )
        return cls(model, tokenizer, dense=dense, max_length=max_length, positional=positional)

    # ------------------------------------------------------------ identity and sizes
    def projection_weights(self) -> tuple[Tensor, Tensor]:
        return self.model.text_projection, self.model.visual.attnpool.c_proj.weight

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.embed_dim)

    @property
    def image_size(self) -> int:
        return int(self.model.config.image_resolution)

    @property
    def text_width(self) -> int:
        return int(self.model.config.text_width)

    @property
    def dense_stride(self) -> int:
        return 32

    @property
    def device(self) -> torch.device:
        return self.model.text_projection.device

    def tower_identity(self, tower: str) -> tuple[list[str], list[Tensor]]:
        m = self.model
        if tower == "text":
            blocks = m.transformer.resblocks
            return [f"openai-resnet-text|{m.config}"], [
                m.token_embedding.weight,
                m.ln_final.weight,
                m.text_projection,
                blocks[0].attn.in_proj_weight,
                blocks[-1].mlp.c_proj.weight,
            ]
        pool = m.visual.attnpool
        return [f"openai-resnet-image|{m.config}", f"dense={self.dense}|positional={self.positional}"], [
            m.visual.conv1.weight,
            m.visual.layer4[-1].conv3.weight,
            pool.positional_embedding,
            pool.v_proj.weight,
            pool.c_proj.weight,
        ]

    # ----------------------------------------------------------------------- text
    @torch.no_grad()
    def encode_text(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, normalize: bool = True
    ) -> TextEmbeddings:
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        tokens = self.model.project_text(self.model.text_hidden(self.model.embed_tokens(input_ids)))
        eot = tokens[torch.arange(tokens.shape[0], device=tokens.device), self.eot_index(input_ids)]
        if normalize:
            tokens, eot = F.normalize(tokens, dim=-1), F.normalize(eot, dim=-1)
        return TextEmbeddings(eot, tokens, attention_mask.bool())

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids.to(self.device))

    def encode_text_embeddings(
        self, inputs_embeds: Tensor, eot_index: Tensor, normalize: bool = True
    ) -> Tensor:
        hidden = self.model.text_hidden(inputs_embeds)
        eot = hidden[torch.arange(hidden.shape[0], device=hidden.device), eot_index.to(hidden.device)]
        out = self.model.project_text(eot)
        return F.normalize(out, dim=-1) if normalize else out

    # ---------------------------------------------------------------------- image
    @torch.no_grad()
    def encode_image(
        self, pixel_values: Tensor, normalize: bool = True, dense: str | None = None
    ) -> ImageEmbeddings:
        dense = dense or self.dense
        if dense not in RESNET_DENSE_MODES:
            raise ValueError(f"dense must be one of {RESNET_DENSE_MODES} for a ResNet CLIP, got {dense!r}")
        image, patches = self.model.encode_image(pixel_values.to(self.device), positional=self.positional)
        if normalize:
            image, patches = F.normalize(image, dim=-1), F.normalize(patches, dim=-1)
        return ImageEmbeddings(image, patches)
