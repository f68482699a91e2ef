"""TaI-DPT's double-grained prompts (docs/method.md §4): two learned CoOp contexts, through the frozen CLIP.

    prompt_c = [SOS] ctx_1 .. ctx_n {class name} . [EOS]        n = 16 learned token embeddings
    (a tokenizer without a start token, SigLIP's: ctx_1 .. ctx_n {class name} [EOS], padded as it pads)
    T_g = norm(TextEnc(ctx_global ⊕ name_c)),  T_l = norm(TextEnc(ctx_local ⊕ name_c))       (C, D) each

The contexts are the only parameters; CLIP stays frozen and gradients reach the contexts through it. The
head uses ``T_g`` / ``T_l`` in place of ``T0`` in its global / local branch (``DualBranchHead(bases=...)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from dbtr.text.names import prompt_name
from dbtr.utils.errors import ConfigError


class PromptLearner(nn.Module):
    """Global and local learned contexts shared by all classes (or one per class with ``class_specific``).

    :param encoder: the frozen :class:`~dbtr.models.clip.ClipEncoder` (used here for tokens and sizes only;
        not kept as a submodule, so checkpoints hold the contexts alone).
    :param class_names: the label space; each is prompted by its :func:`prompt_name`.
    :param n_ctx: number of context tokens per prompt (TaI-DPT: 16).
    :param ctx_init: ``None`` = random ``N(0, ctx_std^2)`` (TaI-DPT); or a text whose token embeddings start
        both contexts (CoOp's ``"a photo of a"``; its token count must equal ``n_ctx``).
    :param class_specific: one context per class (CoOp's CSC) instead of one shared "generic" context.
    :param prompt_names: ``{class: text}`` written in place of the class name (TaI-DPT's own class names).
    """

    def __init__(
        self,
        encoder,
        class_names: Sequence[str],
        n_ctx: int = 16,
        ctx_init: str | None = None,
        ctx_std: float = 0.02,
        class_specific: bool = False,
        prompt_names: Mapping[str, str] | None = None,
    ):
        super().__init__()
        if n_ctx < 1:
            raise ConfigError(f"model.prompts.n_ctx must be >= 1, got {n_ctx}")
        tok = encoder.tokenizer
        width = encoder.text_width
        rows = []
        self.lead = _leading_specials(tok, tok("a")["input_ids"])  # 1: [SOS] comes first; 0: none
        for name in class_names:
            ids = tok(f"{prompt_name(name, prompt_names)}.")["input_ids"]  # [SOS] name . [EOS]
            # the context slots hold the first id as placeholders (never read; SOS, or SigLIP's first name
            # token: any id but EOS, which marks CLIP's EOT)
            row = ids[: self.lead] + ids[:1] * n_ctx + ids[self.lead :]
            if len(row) > encoder.max_length:
                raise ConfigError(
                    f"the prompt of class {name!r} has {len(row)} tokens with n_ctx={n_ctx} context tokens, "
                    f"more than the text encoder's {encoder.max_length}: lower model.prompts.n_ctx or "
                    "shorten the class name"
                )
            rows.append(row)
        # CLIP's causal tower: EOS to the longest prompt; SigLIP's: pads to its full length (encoder.pad_ids)
        ids = encoder.pad_ids(rows)
        self.register_buffer("token_ids", ids, persistent=False)
        self.register_buffer("eot_index", encoder.eot_index(ids), persistent=False)
        self.n_ctx, self.class_specific = int(n_ctx), bool(class_specific)
        shape = (len(rows), n_ctx, width) if class_specific else (n_ctx, width)
        self.ctx_global = nn.Parameter(self._init(encoder, shape, ctx_init, ctx_std))
        self.ctx_local = nn.Parameter(self._init(encoder, shape, ctx_init, ctx_std))

    def _init(self, encoder, shape: tuple[int, ...], ctx_init: str | None, std: float) -> Tensor:
        if not ctx_init:
            return torch.randn(shape) * std
        ids = encoder.tokenizer(ctx_init)["input_ids"]
        ids = ids[self.lead : -1 if ids and ids[-1] == encoder.eos_token_id else None]  # without SOS / EOS
        if len(ids) != self.n_ctx:
            raise ConfigError(
                f"model.prompts.ctx_init {ctx_init!r} has {len(ids)} tokens but "
                f"model.prompts.n_ctx={self.n_ctx}"
            )
        with torch.no_grad():
            emb = encoder.embed_tokens(torch.tensor(ids)).float().cpu()
        return emb.expand(shape).clone()

    def prompt_embeddings(self, encoder, ctx: Tensor) -> Tensor:
        """(C, L, W) input embeddings: the class prompts' token embeddings with ``ctx`` in slots 1..n_ctx."""
        with torch.no_grad():
            tokens = encoder.embed_tokens(self.token_ids)
        ctx = ctx.to(device=tokens.device, dtype=tokens.dtype)
        if ctx.dim() == 2:
            ctx = ctx.expand(tokens.shape[0], -1, -1)
        lead = self.lead
        return torch.cat([tokens[:, :lead], ctx, tokens[:, lead + self.n_ctx :]], dim=1)

    def forward(self, encoder) -> tuple[Tensor, Tensor]:
        """``(T_g, T_l)``, each (C, D), L2-normalised float32; one text-tower pass for both prompt sets."""
        embeds = torch.cat(
            [
                self.prompt_embeddings(encoder, self.ctx_global),
                self.prompt_embeddings(encoder, self.ctx_local),
            ]
        )
        out = encoder.encode_text_embeddings(embeds, self.eot_index.repeat(2)).float()
        return out[: len(self.token_ids)], out[len(self.token_ids) :]

    def version(self) -> tuple:
        """Changes whenever a context is modified in place (optimizer step, load_state_dict) or moved."""
        return tuple((p._version, p.data_ptr(), p.device) for p in (self.ctx_global, self.ctx_local))


def _leading_specials(tokenizer, ids: Sequence[int]) -> int:
    """How many start tokens the tokenizer puts before the text: 1 for CLIP's SOS, 0 for SigLIP's (none)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return int(bos is not None and len(ids) > 0 and ids[0] == bos)
