"""Dual-branch task-residual head with parameter-free attention (pure torch, docs/method.md §3).

Inputs are L2-normalised CLIP features: a global vector per sample (image CLS embedding, or a caption's
EOT embedding) and a set of local vectors (image patches, or caption tokens with a padding mask).

    global branch:  T_g = norm(T0 + a_g X_g);   z_g = s * f_g T_g^T
    local branch:   T_l = norm(T0 + a_l X_l);   A = F T_l^T;   z_l = sum_N s * A * softmax_N(tau * A)
    PFA (per branch b, no weights):  W_sp = softmax_N(A_b / t),  W_cl = softmax_C(A_b / t)
                    T_a = W_sp^T F  (class-wise visual text),  F_a = W_cl T_b  (text-aware locals)
                    z_b += beta2 * s * <q_b, T_a>  +  beta3 * s * (mean_N F_a + max_N F_a) T_b^T
    score = w * z_g + (1 - w) * z_l

With learned prompts (TaI-DPT, ``dbtr/models/prompts.py``) the branches start from the prompts' class
embeddings (``bases``) instead of T0. Every baseline of the paper is a setting of this one module (see
``conf/model/``), not a code fork.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dbtr.utils.errors import ConfigError

PFA_MODES = ("none", "global", "local", "both")


@dataclass
class HeadOutput:
    """``logits`` is the merged score; branch logits are kept for per-branch metrics and losses."""

    logits: Tensor
    logits_global: Tensor
    logits_local: Tensor | None
    local_attention: Tensor | None  # (B, N, C) spatial softmax of the local branch: the heatmaps


def masked_softmax(scores: Tensor, mask: Tensor | None, dim: int) -> Tensor:
    """Softmax over ``dim`` ignoring positions where ``mask`` is False (a fully masked row gives zeros)."""
    if mask is None:
        return torch.softmax(scores, dim=dim)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=dim).nan_to_num(0.0)


def masked_mean(x: Tensor, mask: Tensor | None, dim: int) -> Tensor:
    if mask is None:
        return x.mean(dim)
    m = mask.to(x.dtype)
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1.0)


def masked_max(x: Tensor, mask: Tensor | None, dim: int) -> Tensor:
    if mask is None:
        return x.amax(dim)
    return x.masked_fill(~mask, float("-inf")).amax(dim).nan_to_num(0.0, neginf=0.0)


def spatial_aggregation(sim: Tensor, mask: Tensor | None, tau: float, scale: float) -> tuple[Tensor, Tensor]:
    """TaI-DPT local score: ``sum_N s * A * softmax_N(tau * A)``. ``sim`` (B, N, C), ``mask`` (B, N).

    Returns the logits (B, C) and the spatial weights (B, N, C).
    """
    m = None if mask is None else mask[..., None]
    weights = masked_softmax(tau * sim, m, dim=1)
    return scale * (sim * weights).sum(1), weights


def parameter_free_attention(
    local: Tensor, classes: Tensor, mask: Tensor | None, temperature: float
) -> tuple[Tensor, Tensor]:
    """CALIP's bidirectional attention between locals (B, N, D) and class embeddings (C, D).

    Returns ``text_attended`` (B, C, D): each class embedding replaced by its attention-weighted mix of
    locals, and ``pooled_locals`` (B, D): mean + max over valid positions of the class-attended locals.
    Neither is renormalised (as in CALIP), so the beta weights keep their published meaning.
    """
    sim = local @ classes.t() / temperature  # (B, N, C)
    m = None if mask is None else mask[..., None]
    over_space = masked_softmax(sim, m, dim=1)  # per class, over positions
    over_classes = torch.softmax(sim, dim=2)  # per position, over classes
    text_attended = over_space.transpose(1, 2) @ local  # (B, C, D)
    local_attended = over_classes @ classes  # (B, N, D)
    pooled = masked_mean(local_attended, m, dim=1) + masked_max(local_attended, m, dim=1)
    return text_attended, pooled


def valid_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``x`` (B, N, K) over the valid positions of ``mask`` (B, N): one batched mat-vec, not a
    (B, N, K) masked copy (a fully masked row gives zeros)."""
    if mask is None:
        return x.mean(1)
    m = mask.to(x.dtype)
    return (m[:, None, :] @ x).squeeze(1) / m.sum(1, keepdim=True).clamp_min(1.0)


# Elements of one chunk of mixed locals (b, N, D) in the max-pooled PFA term: 2**20 floats = 4 MiB.
_MAX_POOL_CHUNK = 1 << 20


class _MaxPooledMix(torch.autograd.Function):
    """``max_N (W @ T)`` over valid positions, (B, N, C) x (C, D) -> (B, D), over chunks of the batch.

    Only the argmax indices are kept for the backward pass (autograd's ``amax`` would keep the whole
    (B, N, D) product); the backward scatters the incoming gradient to those positions and runs the two
    matmuls per chunk.
    (At an exact tie the gradient goes to one of the tied positions, where ``amax`` would split it.)
    A row without any valid position pools to 0 and gets no gradient (as ``masked_max``).
    """

    @staticmethod
    def forward(ctx, weights: Tensor, classes: Tensor, mask: Tensor | None) -> Tensor:
        b, n, _ = weights.shape
        step = max(1, _MAX_POOL_CHUNK // max(1, n * classes.shape[1]))
        values, index = [], []
        for s in range(0, b, step):
            mixed = weights[s : s + step] @ classes  # (b', N, D)
            if mask is not None:
                mixed.masked_fill_(~mask[s : s + step, :, None], float("-inf"))
            v, i = mixed.max(dim=1)
            values.append(v)
            index.append(i)
        out, index = torch.cat(values), torch.cat(index)
        rows = torch.ones(b, dtype=torch.bool, device=weights.device) if mask is None else mask.any(1)
        out = torch.where(rows[:, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
        ctx.save_for_backward(weights, classes, index, rows)
        ctx.step = step
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        weights, classes, index, rows = ctx.saved_tensors
        need_w, need_t = ctx.needs_input_grad[:2]
        grad = torch.where(rows[:, None], grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
        b, n, c = weights.shape
        d_w = torch.empty_like(weights) if need_w else None
        d_t = torch.zeros_like(classes) if need_t else None
        buffer = grad.new_zeros(min(b, ctx.step), n, grad.shape[1])  # zeroed once, reset after each chunk
        for s in range(0, b, ctx.step):
            g, at = grad[s : s + ctx.step], index[s : s + ctx.step, None, :]
            sparse = buffer[: len(g)].scatter_(1, at, g[:, None, :])  # the gradient at the argmax positions
            if need_w:
                d_w[s : s + ctx.step] = sparse @ classes.t()
            if need_t:
                d_t.addmm_(weights[s : s + ctx.step].reshape(-1, c).t(), sparse.reshape(-1, sparse.shape[-1]))
            sparse.scatter_(1, at, 0.0)
        return d_w, d_t, None


def pfa_terms(
    query: Tensor,
    local: Tensor,
    classes: Tensor,
    mask: Tensor | None,
    temperature: float,
    sim: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The two PFA scores (B, C) of docs/method.md §3.4, ``<q, T_a[c]>`` and ``f_a T^T``, without building the
    (B, C, D) attended text or the (B, N, D) attended locals of :func:`parameter_free_attention`:

        <q, W_sp^T F> = W_sp^T (F q)        mean_N(W_cl T) T^T = mean_N(W_cl) (T T^T)

    and only the max-pooled term forms ``W_cl T``, chunk by chunk (:class:`_MaxPooledMix`). ``sim`` may pass
    ``local @ classes.t()`` when the caller has it already (the local branch does).
    """
    sim = (local @ classes.t() if sim is None else sim) / temperature  # (B, N, C)
    m = None if mask is None else mask[..., None]
    over_space = masked_softmax(sim, m, dim=1)  # per class, over positions
    over_classes = torch.softmax(sim, dim=2)  # per position, over classes
    attended = ((local @ query[:, :, None]).transpose(1, 2) @ over_space).squeeze(1)  # (B, C)
    pooled = valid_mean(over_classes, mask) @ (classes @ classes.t())
    pooled = pooled + _MaxPooledMix.apply(over_classes, classes, mask) @ classes.t()
    return attended, pooled


class TaskResidual(nn.Module):
    """TaskRes classifier ``T = norm(T0 + alpha * X)`` with ``X`` zero-initialised (or off: ``T = T0``).

    ``X`` is a free (C, D) parameter, or with ``generator_hidden > 0`` a small shared map ``X = g(T0)`` (last
    layer zero-initialised) that also gives a residual to class names never trained on. ``row_mask`` zeroes
    the free residual of classes that must keep T0 (unseen classes in the seen/unseen protocol).
    """

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        alpha: float = 0.5,
        enabled: bool = True,
        generator_hidden: int = 0,
    ):
        super().__init__()
        self.alpha = float(alpha)
        self.residual = (
            nn.Parameter(torch.zeros(num_classes, embed_dim)) if enabled and not generator_hidden else None
        )
        self.generator = None
        if enabled and generator_hidden:
            self.generator = nn.Sequential(
                nn.Linear(embed_dim, generator_hidden), nn.GELU(), nn.Linear(generator_hidden, embed_dim)
            )
            nn.init.zeros_(self.generator[2].weight)
            nn.init.zeros_(self.generator[2].bias)
        self.register_buffer("row_mask", torch.ones(num_classes), persistent=False)

    def forward(self, base: Tensor) -> Tensor:
        if self.generator is not None:
            return F.normalize(base + self.alpha * self.generator(base), dim=-1)
        if self.residual is None:
            return base
        return F.normalize(
            base + self.alpha * (self.residual * self.row_mask[:, None]).to(base.dtype), dim=-1
        )


class DualBranchHead(nn.Module):
    """Global and local task-residual branches with optional parameter-free attention.

    :param num_classes: C; :param embed_dim: D (CLIP projection dim).
    :param global_residual / local_residual: learn a residual in that branch (False = fixed T0).
    :param alpha_global / alpha_local: residual scales (TaskRes uses 0.5).
    :param use_local: compute the local branch at all (False = global-only models).
    :param pfa: which branches get parameter-free attention: none | global | local | both.
    :param pfa_temperature: softmax temperature of the PFA (CALIP's code uses 0.5, i.e. x2).
    :param beta2 / beta3: weights of the attended-text and attended-local PFA terms.
    :param pfa_local_query: what the local branch compares with the attended text: the L2-normalised mean of
        the (valid) locals, so that its scale matches the global query; or the global embedding itself.
    :param pfa_center: subtract each sample's mean over classes from the PFA terms. CALIP was built for
        single-label top-1, where a per-image offset is harmless; multi-label AP ranks images per class, and
        the attended terms carry a large image-dependent, class-independent part that scrambles that ranking.
    :param logit_scale: s (TaI-DPT fixes 4; the ranking margin 1 is then a cosine gap of 0.25).
    :param tau_text / tau_image: spatial softmax temperatures for caption tokens / image patches.
    :param merge_weight: w in ``w * z_g + (1 - w) * z_l``.
    :param feature_noise_std: Gaussian noise added to normalised caption features in training, then
        renormalised.
    :param center_scores: subtract each sample's mean over classes from the merged score (a training-free
        baseline).
    :param residual_generator: hidden width of a shared residual generator ``X = g(T0)`` instead of free
        per-class residuals (0 = free); it transfers what was learned to class names without training labels.
    :param prompts: a :class:`~dbtr.models.prompts.PromptLearner` whose contexts are trained with the head;
        its class embeddings are passed to ``forward`` as ``bases`` (they need the text tower, which the head
        has not).
    """

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        global_residual: bool = True,
        local_residual: bool = True,
        alpha_global: float = 0.5,
        alpha_local: float = 0.5,
        use_local: bool = True,
        pfa: Literal["none", "global", "local", "both"] = "both",
        pfa_temperature: float = 0.5,
        beta2: float = 1.0,
        beta3: float = 0.1,
        pfa_local_query: Literal["mean", "global"] = "mean",
        pfa_center: bool = True,
        logit_scale: float = 4.0,
        tau_text: float = 50.0,
        tau_image: float = 40.0,
        merge_weight: float = 0.5,
        feature_noise_std: float = 0.0,
        center_scores: bool = False,
        residual_generator: int = 0,
        prompts: nn.Module | None = None,
    ):
        super().__init__()
        if pfa not in PFA_MODES:
            raise ConfigError(f"model.head.pfa must be one of {PFA_MODES}, got {pfa!r}")
        if pfa in ("local", "both") and not use_local:
            raise ConfigError(f"model.head.pfa={pfa} needs the local branch (model.head.use_local=true)")
        if pfa_local_query not in ("mean", "global"):
            raise ConfigError(
                f"model.head.pfa_local_query must be 'mean' or 'global', got {pfa_local_query!r}"
            )
        if not 0.0 <= merge_weight <= 1.0:
            raise ConfigError(f"model.head.merge_weight must be in [0, 1], got {merge_weight}")
        self.num_classes, self.embed_dim = int(num_classes), int(embed_dim)
        self.global_classifier = TaskResidual(
            num_classes, embed_dim, alpha_global, enabled=global_residual, generator_hidden=residual_generator
        )
        self.local_classifier = TaskResidual(
            num_classes,
            embed_dim,
            alpha_local,
            enabled=use_local and local_residual,
            generator_hidden=residual_generator,
        )
        self.use_local = use_local
        self.pfa, self.pfa_temperature, self.beta2, self.beta3 = pfa, pfa_temperature, beta2, beta3
        self.pfa_local_query, self.pfa_center = pfa_local_query, pfa_center
        self.logit_scale, self.tau_text, self.tau_image = logit_scale, tau_text, tau_image
        self.merge_weight, self.feature_noise_std, self.center_scores = (
            merge_weight,
            feature_noise_std,
            center_scores,
        )
        self.prompts = prompts
        # T0 depends on the CLIP model and the class names, both known from hyper-parameters: rebuilt, not
        # saved.
        self.register_buffer("class_embeds", torch.zeros(num_classes, embed_dim), persistent=False)
        self.register_buffer("class_embeds_ready", torch.tensor(False), persistent=False)

    def set_class_embeddings(self, class_embeds: Tensor) -> None:
        if tuple(class_embeds.shape) != (self.num_classes, self.embed_dim):
            raise ValueError(
                f"class embeddings have shape {tuple(class_embeds.shape)}, the head expects "
                f"({self.num_classes}, {self.embed_dim}) = (classes, CLIP projection dim)"
            )
        self.class_embeds.copy_(F.normalize(class_embeds.float(), dim=-1))
        self.class_embeds_ready.fill_(True)

    def set_residual_classes(self, learned: Tensor) -> None:
        """Only classes with ``learned[c]`` True use their free residual; the others keep T0 (zero
        residual)."""
        for branch in (self.global_classifier, self.local_classifier):
            branch.row_mask.copy_(learned.to(branch.row_mask))

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def _noise(self, x: Tensor) -> Tensor:
        return F.normalize(x + self.feature_noise_std * torch.randn_like(x), dim=-1)

    def _pfa_logits(
        self, query: Tensor, local: Tensor, classes: Tensor, mask: Tensor | None, sim: Tensor | None = None
    ) -> Tensor:
        z2, z3 = pfa_terms(query, local, classes, mask, self.pfa_temperature, sim)
        z = self.logit_scale * (self.beta2 * z2 + self.beta3 * z3)
        return z - z.mean(dim=1, keepdim=True) if self.pfa_center else z

    def _local_scores(
        self, feats: Tensor, t_l: Tensor, mask: Tensor | None, modality: str, sim: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        tau = self.tau_text if modality == "text" else self.tau_image
        return spatial_aggregation(feats @ t_l.t() if sim is None else sim, mask, tau, self.logit_scale)

    def _bases(self, bases: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """Per-branch base class embeddings: T0 for both, or the given (e.g. learned-prompt) pair."""
        if bases is not None:
            return bases[0].float(), bases[1].float()
        if not bool(self.class_embeds_ready):
            raise RuntimeError("class embeddings are not set: call set_class_embeddings(T0) first")
        return self.class_embeds, self.class_embeds

    @torch.no_grad()
    def local_attention(
        self,
        local_embeds: Tensor,
        local_mask: Tensor | None = None,
        modality: Literal["text", "image"] = "image",
        bases: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """The local branch's spatial softmax (B, N, C): per class, how its score is spread over positions.

        The same weights ``forward`` uses for ``z_l`` (``HeadOutput.local_attention``), without the global
        branch and the attention terms: the "where did it see class c" map drawn by the heatmaps.
        """
        if not self.use_local:
            raise ValueError(
                "this head has no local branch (use_local=false): there is no spatial attention to show"
            )
        base_l = self._bases(bases)[1]
        if modality not in ("text", "image"):
            raise ValueError(f"modality must be 'text' or 'image', got {modality!r}")
        mask = None if local_mask is None else local_mask.bool()
        t_l = self.local_classifier(base_l)
        return self._local_scores(local_embeds.float(), t_l, mask, modality)[1]

    def forward(
        self,
        global_embeds: Tensor,
        local_embeds: Tensor,
        local_mask: Tensor | None = None,
        modality: Literal["text", "image"] = "image",
        bases: tuple[Tensor, Tensor] | None = None,
    ) -> HeadOutput:
        """``global_embeds`` (B, D), ``local_embeds`` (B, N, D), ``local_mask`` (B, N) bool (True = valid).

        ``bases`` = (global, local) class embeddings (C, D) used instead of T0 (TaI-DPT's learned prompts).
        """
        base_g, base_l = self._bases(bases)
        if modality not in ("text", "image"):
            raise ValueError(f"modality must be 'text' or 'image', got {modality!r}")
        # the head runs in fp32 even under autocast (bf16 CLIP on an accelerator): its margins need it
        with torch.autocast(global_embeds.device.type, enabled=False):
            f_g, feats = global_embeds.float(), local_embeds.float()
            return self._forward(f_g, feats, local_mask, modality, base_g, base_l)

    def _forward(
        self,
        f_g: Tensor,
        feats: Tensor,
        local_mask: Tensor | None,
        modality: str,
        base_g: Tensor,
        base_l: Tensor,
    ) -> HeadOutput:
        mask = None if local_mask is None else local_mask.bool()
        if self.training and modality == "text" and self.feature_noise_std > 0:
            f_g, feats = self._noise(f_g), self._noise(feats)
        t_g = self.global_classifier(base_g)
        z_g = self.logit_scale * f_g @ t_g.t()
        if self.pfa in ("global", "both"):
            z_g = z_g + self._pfa_logits(f_g, feats, t_g, mask)
        z_l, attention = None, None
        if self.use_local:
            t_l = self.local_classifier(base_l)
            sim = feats @ t_l.t()  # shared by the spatial aggregation and the local PFA
            z_l, attention = self._local_scores(feats, t_l, mask, modality, sim)
            if self.pfa in ("local", "both"):
                if self.pfa_local_query == "global":
                    query = f_g
                else:
                    query = F.normalize(valid_mean(feats, mask), dim=-1)
                z_l = z_l + self._pfa_logits(query, feats, t_l, mask, sim)
        score = z_g if z_l is None else self.merge_weight * z_g + (1.0 - self.merge_weight) * z_l
        if self.center_scores:
            score = score - score.mean(dim=1, keepdim=True)
        return HeadOutput(score, z_g, z_l, attention)
