"""TagCLIP (Lin et al., AAAI 2024; linyq2117/TagCLIP; docs/tagclip.md): training-free multi-label scores from
CLIP's patch classification, aggregated local-to-global.

Image side (``clip.dense=tagclip``, :mod:`dbtr.models.clip`): patch embeddings P from the last ViT block with
self-only attention (scores + (1 - I) * -100, residual and MLP kept), and DMAR's patch affinity W from the
unmasked, head-averaged attention maps A_l of all L blocks (:func:`dmar_affinity`):

    W = mean_{l in the 3 blocks before the last} A_l  *  [#{l : A_l > mean(A_l)} >= L / 3]

Score side (:class:`TagClipHead`), C classes plus K background words, s = CLIP's logit scale:

    coarse   S = softmax_{C+K}(s P T^T)                        (B, N, C+K), per patch
    DMAR     R0 = W S;  per column c: M_c = boxes(R0_c);  R_c = W (M_c * S_c)     (:func:`dmar`)
    local    l_c = max_N R_c                                    (local-to-global)
    global   g = softmax_{C+K}(s f T^T)                         (f = CLS embedding of the whole image)
    fusion   y_c = (1 - w) l_c + w g_c  if l_c > min R + 0.5 (max R - min R), else l_c   (w = 0.5)

``boxes`` is TagCLIP's ``scoremap2bbox``: the union of the bounding boxes of the 8-connected regions of the
min-max normalised map above its mean (:func:`box_masks`). TagCLIP's fusion (CWR) takes g from a re-encoded
crop of each candidate class; here g is the whole image's (one pass, cacheable features: docs/tagclip.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dbtr.models.heads import HeadOutput
from dbtr.text.names import prompt_name
from dbtr.utils.errors import ConfigError

log = logging.getLogger(__name__)

# the relative threshold of TagCLIP's CWR candidates (classify.py thres_abs = 0.5, all but COCO-Stuff)
CANDIDATE_THRESHOLD = 0.5


# ------------------------------------------------------------------------------------------- image side
def dmar_window(depth: int) -> slice:
    """The blocks DMAR averages: TagCLIP's ``[8:-1]`` of 12, i.e. the three before the last."""
    return slice(max(0, depth - 4), max(1, depth - 1))


def dmar_votes(depth: int) -> int:
    """How many blocks must rate a patch pair above their mean attention: TagCLIP's 4 of 12, i.e. a third."""
    return math.ceil(depth / 3)


def dmar_affinity(attentions: Sequence[Tensor]) -> Tensor:
    """DMAR's patch-to-patch affinity (B, N, N) from every block's head-averaged attention (B, N+1, N+1),
    first block to last, all unmasked (TagCLIP reads the last block's weights before its self-only mask).

    The average of the :func:`dmar_window` blocks, kept where at least :func:`dmar_votes` blocks attend above
    their own mean (CLS row and column dropped first, not renormalised: TagCLIP's ``attn_weight``).
    """
    depth = len(attentions)
    maps = [a[:, 1:, 1:].float() for a in attentions]
    votes = sum((a > a.mean(dim=(1, 2), keepdim=True)).int() for a in maps)
    return torch.stack(maps[dmar_window(depth)]).mean(0) * (votes >= dmar_votes(depth))


# ------------------------------------------------------------------------------------------- score side
def patch_classification(embeds: Tensor, text: Tensor, scale: float) -> Tensor:
    """softmax over the C + K text embeddings (C+K, D) of ``scale * <e, t>``, per embedding (..., D)."""
    return torch.softmax(scale * embeds @ text.t(), dim=-1)


def _components(fg: Tensor) -> Tensor:
    """8-connected regions of boolean maps (M, H, W): each foreground pixel labelled 1 + the largest flat
    index of its region, background 0 (labels spread by 3x3 max-pooling until they stop changing)."""
    m, h, w = fg.shape
    ids = torch.arange(1, h * w + 1, dtype=torch.float32, device=fg.device).view(1, h, w)
    keep = fg.float()
    labels = ids * keep
    while True:
        grown = F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0] * keep
        if torch.equal(grown, labels):
            return labels.long()
        labels = grown


def box_masks(maps: Tensor, grid: tuple[int, int]) -> Tensor:
    """TagCLIP's box mask of each map (M, N) over a row-major ``grid`` of N patches: (M, N) of 0 / 1.

    As its ``scoremap2bbox(multi_contour_eval=True)`` on ``minmax(map)`` with threshold ``mean``: the pixels
    ``uint8(255 x) > int(255 mean)``, the bounding box of each 8-connected region (the external contours'),
    and the union of the boxes. The released code clips each box's exclusive end to H-1 / W-1, so the last
    grid row and column never belong to a box; reproduced. A constant map (TagCLIP divides by zero) gets no
    restriction (all ones).
    """
    m, n = maps.shape
    h, w = grid
    if h * w != n:
        raise ValueError(f"a {h}x{w} patch grid does not hold {n} patches")
    lo, hi = maps.amin(1, keepdim=True), maps.amax(1, keepdim=True)
    flat = (hi <= lo).squeeze(1)
    norm = (maps - lo) / torch.where(flat[:, None], torch.ones_like(hi), hi - lo)
    fg = torch.floor(norm * 255) > torch.floor(norm.mean(1, keepdim=True) * 255)
    labels = _components(fg.view(m, h, w)).view(m, n)
    pos = torch.arange(n, device=maps.device).expand(m, n)
    rows, cols = pos // w, pos % w

    def reduce(values: Tensor, how: str, fill: int) -> Tensor:  # per label (M, N+1); column 0 = background
        out = torch.full((m, n + 1), fill, dtype=torch.long, device=maps.device)
        return out.scatter_reduce(1, labels, values, how, include_self=True)[:, 1:]

    r0, c0 = reduce(rows, "amin", n), reduce(cols, "amin", n)
    r1 = reduce(rows, "amax", -1).clamp(max=h - 2)  # inclusive last row of each box (see above)
    c1 = reduce(cols, "amax", -1).clamp(max=w - 2)
    valid = (r1 >= r0) & (c1 >= c0)  # labels that exist and keep a non-empty box
    # union of boxes: +1 / -1 at the corners of a (H+1, W+1) difference array, then 2-D cumulative sums
    # (the corners of absent labels are sent to index 0 with weight 0)
    diff = torch.zeros(m, (h + 1) * (w + 1), device=maps.device)
    one = valid.float()
    for r, c, sign in ((r0, c0, 1), (r0, c1 + 1, -1), (r1 + 1, c0, -1), (r1 + 1, c1 + 1, 1)):
        diff.scatter_add_(1, (r * (w + 1) + c) * valid, sign * one)
    inside = diff.view(m, h + 1, w + 1).cumsum(1).cumsum(2)[:, :h, :w].reshape(m, n) > 0.5
    return (inside | flat[:, None]).float()


def dmar(coarse: Tensor, affinity: Tensor, grid: tuple[int, int]) -> Tensor:
    """Dual-masking attention refinement of patch probabilities ``coarse`` (B, N, K) with ``affinity`` (B, N,
    N): ``R0 = W S``, then per column ``R_c = W (M_c * S_c)`` with ``M_c`` the :func:`box_masks` of
    ``R0_c`` (columns whose R0 is all zero keep it, as TagCLIP's candidate test ``max > 0``)."""
    b, n, k = coarse.shape
    refined0 = affinity @ coarse
    maps = refined0.transpose(1, 2).reshape(b * k, n)
    boxes = box_masks(maps, grid).view(b, k, n).transpose(1, 2)
    refined = affinity @ (boxes * coarse)
    return torch.where(refined0.amax(1, keepdim=True) > 0, refined, refined0)


def fuse_global(
    local: Tensor,
    refined: Tensor,
    global_probs: Tensor,
    weight: float,
    threshold: float = CANDIDATE_THRESHOLD,
) -> Tensor:
    """CWR's fusion: ``(1 - w) l_c + w g_c`` for the candidate classes, ``l_c > min R + t (max R - min R)``
    over each image's refined maps R (B, N, C+K) (background columns included, as TagCLIP); others keep
    ``l_c``. ``local`` and ``global_probs`` are (B, C)."""
    lo, hi = refined.flatten(1).amin(1, keepdim=True), refined.flatten(1).amax(1, keepdim=True)
    candidate = local > lo + threshold * (hi - lo)
    return torch.where(candidate, (1.0 - weight) * local + weight * global_probs, local)


def background_words(
    class_names: Sequence[str], background: Sequence[str], prompt_names: Mapping[str, str] | None = None
) -> list[str]:
    """``background`` without the words that are, or occur in, a class name as the model prompts it, in
    singular or plural (TagCLIP's COCO list is its VOC list without ``keyboard`` and ``sign``: COCO has
    *keyboard* and *stop sign*; NUS-WIDE's *clouds* removes ``cloud``, which would compete with its own
    class in every patch)."""
    from dbtr.zeroshot.sparc import surface_forms

    taken: set[str] = set()
    for name in class_names:
        text = prompt_name(name, prompt_names).lower()
        for word in (text, *text.split()):
            taken.update(surface_forms(word))
    kept, seen = [], set()
    for word in background:
        word = str(word).strip()
        if not word:
            raise ConfigError("model.head.background holds an empty word; give words such as [sky, road]")
        if word.lower() not in taken and word.lower() not in seen:
            kept.append(word)
            seen.add(word.lower())
    dropped = [w for w in background if str(w).strip().lower() in taken]
    if dropped:
        log.info("TagCLIP background words that name a class are left out: %s", dropped)
    return kept


class TagClipHead(nn.Module):
    """TagCLIP's scores from the image's CLS embedding, patch embeddings and DMAR affinity (module docstring).

    Training-free: no parameters. The text embeddings of the classes then of :attr:`background_names` (C+K,
    D) are set by :meth:`set_class_embeddings` (the lit module builds them with the model's templates).

    :param class_names: the label space (background words that name a class are dropped).
    :param embed_dim: D.
    :param background: TagCLIP's background categories, softmaxed against the classes per patch, never
        scored.
    :param logit_scale: s of both softmaxes (TagCLIP: CLIP's learned scale, 100 for OpenAI's models).
    :param dmar: refine the patch probabilities with the affinity (needs ``clip.dense=tagclip``'s affinity).
    :param global_weight: w of the fusion with the whole image's global probabilities (0 = local only).
    :param candidate_threshold: the relative threshold selecting the classes that are fused.
    :param prompt_names: the model's class texts (the lit module's ``prompt_names``), for the background rule.
    """

    consumes_affinity = True  # the lit module passes the encoder's DMAR affinity to forward
    use_local = True  # it has patch-level maps (``local_attention``: the heatmaps)

    def __init__(
        self,
        class_names: Sequence[str],
        embed_dim: int,
        background: Sequence[str] = (),
        logit_scale: float = 100.0,
        dmar: bool = True,
        global_weight: float = 0.5,
        candidate_threshold: float = CANDIDATE_THRESHOLD,
        prompt_names: Mapping[str, str] | None = None,
    ):
        super().__init__()
        if not 0.0 <= global_weight <= 1.0:
            raise ConfigError(f"model.head.global_weight must be in [0, 1], got {global_weight}")
        if not 0.0 <= candidate_threshold <= 1.0:
            raise ConfigError(f"model.head.candidate_threshold must be in [0, 1], got {candidate_threshold}")
        if not logit_scale or logit_scale <= 0:
            raise ConfigError(f"model.head.logit_scale must be a positive number, got {logit_scale}")
        self.num_classes, self.embed_dim = len(class_names), int(embed_dim)
        self.background_names = background_words(class_names, background, prompt_names)
        self.logit_scale, self.dmar = float(logit_scale), bool(dmar)
        self.global_weight, self.candidate_threshold = float(global_weight), float(candidate_threshold)
        self.prompts = None  # no learned prompts (the lit module refuses them for this head)
        width = self.num_classes + len(self.background_names)
        self.register_buffer("class_embeds", torch.zeros(width, embed_dim), persistent=False)
        self.register_buffer("class_embeds_ready", torch.tensor(False), persistent=False)

    @property
    def trainable(self) -> bool:
        return False

    def set_class_embeddings(self, class_embeds: Tensor) -> None:
        """The classes' then the background words' text embeddings (C+K, D)."""
        if tuple(class_embeds.shape) != tuple(self.class_embeds.shape):
            raise ValueError(
                f"text embeddings have shape {tuple(class_embeds.shape)}, the TagCLIP head expects "
                f"{tuple(self.class_embeds.shape)} = (classes + background words, CLIP projection dim)"
            )
        self.class_embeds.copy_(F.normalize(class_embeds.float(), dim=-1))
        self.class_embeds_ready.fill_(True)

    def _text(self) -> Tensor:
        if not bool(self.class_embeds_ready):
            raise RuntimeError("class embeddings are not set: call set_class_embeddings first")
        return self.class_embeds

    def refined_maps(self, local_embeds: Tensor, affinity: Tensor | None) -> Tensor:
        """The patch probabilities over classes + background (B, N, C+K), refined by DMAR when enabled."""
        coarse = patch_classification(local_embeds.float(), self._text(), self.logit_scale)
        if not self.dmar:
            return coarse
        if affinity is None:
            raise ConfigError(
                "TagCLIP's DMAR needs the patch affinity that clip.dense=tagclip computes (model.dense="
                "tagclip with a ViT CLIP), and these image features carry none; set model.dense=tagclip, or "
                "turn DMAR off with model.head.dmar=false"
            )
        n = local_embeds.shape[1]
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} patches do not form a square grid (TagCLIP's boxes need one)")
        return dmar(coarse, affinity.float(), (side, side))

    def forward(
        self,
        global_embeds: Tensor,
        local_embeds: Tensor,
        local_mask: Tensor | None = None,
        modality: str = "image",
        bases: tuple[Tensor, Tensor] | None = None,
        affinity: Tensor | None = None,
    ) -> HeadOutput:
        """``global_embeds`` (B, D), ``local_embeds`` (B, N, D) patches, ``affinity`` (B, N, N)."""
        if modality != "image" or local_mask is not None or bases is not None:
            raise ValueError("the TagCLIP head scores images (patch embeddings) only, with its own text")
        with torch.autocast(global_embeds.device.type, enabled=False):
            refined = self.refined_maps(local_embeds, affinity)
            local = refined[:, :, : self.num_classes].amax(1)
            global_probs = patch_classification(global_embeds.float(), self._text(), self.logit_scale)
            global_probs = global_probs[:, : self.num_classes]
            score = local
            if self.global_weight > 0:
                score = fuse_global(
                    local, refined, global_probs, self.global_weight, self.candidate_threshold
                )
            maps = refined[:, :, : self.num_classes]
            attention = maps / maps.sum(1, keepdim=True).clamp_min(1e-12)
        return HeadOutput(score, global_probs, local, attention)

    @torch.no_grad()
    def local_attention(
        self,
        local_embeds: Tensor,
        local_mask: Tensor | None = None,
        modality: str = "image",
        bases: tuple[Tensor, Tensor] | None = None,
        affinity: Tensor | None = None,
    ) -> Tensor:
        """The refined patch probabilities of the classes, each map normalised to sum 1 (B, N, C)."""
        if modality != "image" or local_mask is not None or bases is not None:
            raise ValueError("the TagCLIP head scores images (patch embeddings) only, with its own text")
        maps = self.refined_maps(local_embeds, affinity)[:, :, : self.num_classes]
        return maps / maps.sum(1, keepdim=True).clamp_min(1e-12)
