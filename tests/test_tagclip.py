"""TagCLIP (docs/tagclip.md) against references written here from its released code (linyq2117/TagCLIP,
clip/clip_model.py and classify.py): the self-only last block per head, DMAR's affinity from HF's own
attention maps, the patch softmax, box masks, refinement, aggregation and fusion per element; then dbtr-train
end to end."""

from __future__ import annotations

import json
import math
from collections import deque

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cli_helpers import run_cli
from dbtr.models.clip import ClipEncoder
from dbtr.models.tagclip import (
    TagClipHead,
    background_words,
    box_masks,
    dmar,
    dmar_affinity,
    fuse_global,
    patch_classification,
)
from dbtr.utils.errors import ConfigError

VOC_BACKGROUND = (  # TagCLIP clip_text.py BACKGROUND_CATEGORY_VOC
    "ground land grass tree building wall sky lake water river sea railway railroad keyboard helmet cloud "
    "house mountain ocean road rock street valley bridge sign"
).split()
COCO_BACKGROUND = [w for w in VOC_BACKGROUND if w not in ("keyboard", "sign")]  # its BACKGROUND_CATEGORY_COCO


# ------------------------------------------------------------------------------------------ image side
def _sharpened(clip_dir, layers: int = 2, gain: float = 1.0):
    """The tiny fixture's CLIP (or a random one with ``layers`` vision blocks), query weights scaled by
    ``gain`` so that attention is far from uniform, eager attention so HF returns its maps."""
    from transformers import CLIPModel, CLIPTokenizer

    from dbtr.models.tiny import tiny_clip_config

    tokenizer = CLIPTokenizer.from_pretrained(str(clip_dir))
    torch.manual_seed(0)
    config = tiny_clip_config(len(tokenizer), vision_num_hidden_layers=layers)
    config._attn_implementation = "eager"
    model = CLIPModel(config).eval()
    with torch.no_grad():
        for layer in model.vision_model.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(gain)
    return model, tokenizer


def _last_block_input(model, pixel_values):
    cache = {}
    last = model.vision_model.encoder.layers[-1]
    handle = last.register_forward_pre_hook(
        lambda mod, args, kwargs: cache.__setitem__("x", args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True,
    )
    model.vision_model(pixel_values=pixel_values)
    handle.remove()
    return cache["x"]


def _reference_self_only(model, pixel_values, off_diagonal: float = -100.0):
    """TagCLIP's layer 11: scores + (1 - I) * -100 over all tokens, per head; residual and MLP kept."""
    x = _last_block_input(model, pixel_values)
    layer = model.vision_model.encoder.layers[-1]
    attn = layer.self_attn
    y = layer.layer_norm1(x)
    q, k, v = attn.q_proj(y), attn.k_proj(y), attn.v_proj(y)
    n, d = x.shape[1], attn.head_dim
    mask = torch.where(torch.eye(n, dtype=torch.bool), 0.0, off_diagonal)
    heads = []
    for h in range(attn.num_heads):
        qh, kh, vh = (t[..., h * d : (h + 1) * d] for t in (q, k, v))
        heads.append(torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(d) + mask, dim=-1) @ vh)
    hidden = x + attn.out_proj(torch.cat(heads, dim=-1))
    hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
    return model.visual_projection(model.vision_model.post_layernorm(hidden[:, 1:]))


@pytest.mark.parametrize("gain", [1.0, 3000.0])
def test_self_only_last_block_matches_per_head_reference(clip_dir, gain):
    model, tokenizer = _sharpened(clip_dir, gain=gain)
    encoder = ClipEncoder(model, tokenizer, dense="tagclip")
    px = torch.randn(2, 3, 32, 32)
    got = encoder.encode_image(px, normalize=False)
    torch.testing.assert_close(got.patch_embeds, _reference_self_only(model, px), atol=1e-4, rtol=1e-4)
    # the global embedding stays CLIP's own
    ref_global = model.get_image_features(pixel_values=px).pooler_output
    torch.testing.assert_close(got.image_embeds, ref_global, atol=1e-5, rtol=1e-5)
    if gain > 1:  # sharp attention: the finite -100 mask is not identity attention (-inf)
        identity = _reference_self_only(model, px, off_diagonal=float("-inf"))
        assert (got.patch_embeds - identity).abs().max() > 1e-2


def _reference_affinity(attentions, depth: int):
    """classify.py literally, per element: mean of blocks [8:-1] (12 blocks), kept where >= 4 blocks attend
    above their own mean; for fewer blocks the same recipe scaled (three before the last, a third)."""
    window = range(8, 11) if depth == 12 else range(max(0, depth - 4), max(1, depth - 1))
    votes = 4 if depth == 12 else math.ceil(depth / 3)
    maps = [a.mean(1)[:, 1:, 1:].double() for a in attentions]  # head average, CLS dropped
    b, n, _ = maps[0].shape
    out = torch.zeros(b, n, n, dtype=torch.float64)
    for s in range(b):
        means = [float(m[s].mean()) for m in maps]
        for i in range(n):
            for j in range(n):
                count = sum(float(maps[layer][s, i, j]) > means[layer] for layer in range(depth))
                if count >= votes:
                    out[s, i, j] = sum(float(maps[layer][s, i, j]) for layer in window) / len(window)
    return out


@pytest.mark.parametrize("depth", [2, 12])
def test_dmar_affinity_matches_hf_attention_maps(clip_dir, depth):
    model, tokenizer = _sharpened(clip_dir, layers=depth, gain=4.0)
    encoder = ClipEncoder(model, tokenizer, dense="tagclip")
    px = torch.randn(2, 3, 32, 32)
    got = encoder.encode_image(px).patch_affinity
    attentions = model.vision_model(pixel_values=px, output_attentions=True).attentions
    assert len(attentions) == depth
    ref = _reference_affinity(attentions, depth)
    torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=1e-5)
    assert (ref == 0).any() and (ref > 0).any()  # the vote mask keeps some pairs and drops others
    assert encoder.encode_image(px, dense="clearclip").patch_affinity is None


def test_twelve_block_window_and_votes_on_synthetic_maps():
    torch.manual_seed(1)
    maps = [torch.rand(1, 10, 10) ** 3 for _ in range(12)]
    got = dmar_affinity(maps)
    ref = _reference_affinity([m[:, None] for m in maps], 12)
    torch.testing.assert_close(got.double(), ref, atol=1e-7, rtol=1e-6)


# ------------------------------------------------------------------------------------------ score side
def _reference_boxes(values: np.ndarray, h: int, w: int) -> np.ndarray:
    """scoremap2bbox(minmax(map), threshold=mean, multi_contour_eval=True) then the aff_mask of mask_attn,
    with a breadth-first 8-neighbour search in place of cv2's external contours."""
    m = values - values.min()
    if m.max() == 0:
        return np.ones(h * w)  # dbtr's convention for a constant map (TagCLIP divides by zero)
    m = m / m.max()
    image = (m * 255).astype(np.uint8).reshape(h, w)
    fg = image > int(m.mean() * image.max())
    seen, mask = np.zeros_like(fg), np.zeros((h, w))
    for r in range(h):
        for c in range(w):
            if not fg[r, c] or seen[r, c]:
                continue
            seen[r, c], queue, cells = True, deque([(r, c)]), []
            while queue:
                y, x = queue.popleft()
                cells.append((y, x))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        yy, xx = y + dy, x + dx
                        if 0 <= yy < h and 0 <= xx < w and fg[yy, xx] and not seen[yy, xx]:
                            seen[yy, xx] = True
                            queue.append((yy, xx))
            ys, xs = [p[0] for p in cells], [p[1] for p in cells]
            x0, y0 = min(xs), min(ys)
            x1, y1 = min(max(xs) + 1, w - 1), min(max(ys) + 1, h - 1)  # boundingRect, clipped as TagCLIP
            mask[y0:y1, x0:x1] = 1
    return mask.reshape(-1)


def test_box_masks_match_reference_on_random_and_shaped_maps():
    rng = np.random.default_rng(0)
    maps = [rng.random(25) ** 4 for _ in range(40)]
    blobs = np.zeros((5, 5))
    blobs[0, 0] = blobs[1, 1] = 1.0  # diagonal neighbours: one region
    blobs[3, 3] = 0.9  # a second region, reaching the clipped last row and column
    maps += [blobs.reshape(-1), np.full(25, 0.3), np.eye(5)[::-1].reshape(-1)]
    got = box_masks(torch.tensor(np.stack(maps)), (5, 5)).numpy()
    for values, mask in zip(maps, got):
        np.testing.assert_array_equal(mask, _reference_boxes(values, 5, 5))
    # the hand-made one, spelled out: box rows/cols 0-1 from the first region, row/col 3 from the second
    expected = np.zeros((5, 5))
    expected[0:2, 0:2] = expected[3:4, 3:4] = 1
    np.testing.assert_array_equal(got[40].reshape(5, 5), expected)


def _reference_scores(global_embeds, patches, text, affinity, classes, scale, weight=0.5, threshold=0.5):
    """classify.py per image in float64 loops: patch softmax, mask_attn, max over patches, CWR's fusion
    (with the whole image's global probabilities in place of the crops'). Returns (final, local, global)."""
    b, n, _ = patches.shape
    k = text.shape[0]
    side = math.isqrt(n)
    finals, locals_, globals_ = [], [], []
    for s in range(b):

        def softmax(vec):
            z = [scale * float(vec @ text[c]) for c in range(k)]
            top = max(z)
            e = [math.exp(v - top) for v in z]
            return [v / sum(e) for v in e]

        coarse = [softmax(patches[s, i]) for i in range(n)]
        w = affinity[s]
        r0 = [[sum(float(w[i, j]) * coarse[j][c] for j in range(n)) for c in range(k)] for i in range(n)]
        refined = [row[:] for row in r0]
        for c in range(k):
            column = np.array([r0[i][c] for i in range(n)])
            if column.max() > 0:
                box = _reference_boxes(column, side, side)
                for i in range(n):
                    refined[i][c] = sum(float(w[i, j]) * box[j] * coarse[j][c] for j in range(n))
        local = [max(refined[i][c] for i in range(n)) for c in range(classes)]
        glob = softmax(global_embeds[s])[:classes]
        lo, hi = min(min(row) for row in refined), max(max(row) for row in refined)
        final = [
            (1 - weight) * local[c] + weight * glob[c] if local[c] > lo + threshold * (hi - lo) else local[c]
            for c in range(classes)
        ]
        finals.append(final)
        locals_.append(local)
        globals_.append(glob)
    return (torch.tensor(x, dtype=torch.float64) for x in (finals, locals_, globals_))


def _inputs(seed: int, b: int = 3, side: int = 5, d: int = 8, k: int = 6):
    torch.manual_seed(seed)
    n = side * side
    patches = F.normalize(torch.randn(b, n, d, dtype=torch.float64), dim=-1)
    global_embeds = F.normalize(torch.randn(b, d, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(k, d, dtype=torch.float64), dim=-1)
    affinity = torch.rand(b, n, n, dtype=torch.float64) * (torch.rand(b, n, n) > 0.4)
    return global_embeds, patches, text, affinity


@pytest.mark.parametrize("seed", [0, 1])
def test_refinement_aggregation_and_fusion_match_reference(seed):
    g, patches, text, affinity = _inputs(seed)
    classes, scale = 4, 10.0
    coarse = patch_classification(patches, text, scale)
    refined = dmar(coarse, affinity, (5, 5))
    local = refined[:, :, :classes].amax(1)
    glob = patch_classification(g, text, scale)[:, :classes]
    final = fuse_global(local, refined, glob, 0.5)
    ref_final, ref_local, ref_global = _reference_scores(g, patches, text, affinity, classes, scale)
    torch.testing.assert_close(local, ref_local, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(glob, ref_global, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(final, ref_final, atol=1e-12, rtol=1e-10)
    assert not torch.equal(final, local)  # some candidates were fused, not all
    assert (final == local).any()


def test_head_outputs_are_the_reference_scores():
    g, patches, text, affinity = _inputs(2)
    names = ["cat", "dog", "stop sign", "bus"]
    head = TagClipHead(names, 8, background=["sky", "sign", "road"], logit_scale=10.0)
    assert head.background_names == ["sky", "road"] and not head.trainable
    head.set_class_embeddings(text[:6].float())
    text = F.normalize(text[:6].float(), dim=-1).double()
    out = head(g.float(), patches.float(), affinity=affinity.float())
    ref_final, ref_local, ref_global = _reference_scores(g, patches, text, affinity, 4, 10.0)
    torch.testing.assert_close(out.logits.double(), ref_final, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.logits_local.double(), ref_local, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.logits_global.double(), ref_global, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.local_attention.sum(1), torch.ones(3, 4))  # heatmaps: one unit each
    # DMAR off: the coarse patch softmax's maximum; global_weight 0: no fusion
    plain = TagClipHead(names, 8, background=["sky", "road"], logit_scale=10.0, dmar=False, global_weight=0.0)
    plain.set_class_embeddings(text.float())
    coarse = patch_classification(patches.float(), text.float(), 10.0)[:, :, :4].amax(1)
    torch.testing.assert_close(plain(g.float(), patches.float()).logits, coarse)


def test_background_rule_turns_the_voc_list_into_the_coco_one():
    assert background_words(["aeroplane", "diningtable", "pottedplant", "tvmonitor"], VOC_BACKGROUND) == (
        VOC_BACKGROUND
    )
    assert background_words(["person", "keyboard", "stop sign", "traffic light"], VOC_BACKGROUND) == (
        COCO_BACKGROUND
    )


def test_head_refuses_missing_affinity_and_bad_settings():
    head = TagClipHead(["a", "b"], 4, logit_scale=10.0)
    head.set_class_embeddings(torch.randn(2, 4))
    with pytest.raises(ConfigError, match="model.head.dmar=false"):
        head(torch.randn(1, 4), torch.randn(1, 4, 4))
    with pytest.raises(ConfigError, match="global_weight"):
        TagClipHead(["a"], 4, global_weight=1.5)
    with pytest.raises(ValueError, match="images"):
        head(torch.randn(1, 4), torch.randn(1, 4, 4), torch.ones(1, 4, dtype=torch.bool), modality="text")


# -------------------------------------------------------------------------------------------- the model
def test_model_dense_replaces_clip_dense_and_refuses_resnets(clip_dir):
    from dbtr.system.lit_module import DbtrLitModule

    names = ["red", "green", "blue"]
    common = dict(class_names=names, head_type="tagclip", dense="tagclip", templates="simple")
    model = DbtrLitModule(clip={"name_or_path": str(clip_dir), "dense": "maskclip"}, **common)
    assert model.encoder.dense == "tagclip" and model.encoder.has_patch_affinity
    assert model.head.logit_scale == pytest.approx(float(model.encoder.model.logit_scale.exp()))
    out = model(torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, 3)
    assert model.attention_maps(torch.randn(1, 3, 32, 32)).shape == (1, 3, 4, 4)
    with pytest.raises(ConfigError, match="ResNet CLIP") as info:
        DbtrLitModule(clip={"name_or_path": "/weights/RN50.pt"}, **common)
    assert "clip=vit_b16" in str(info.value)
    with pytest.raises(ConfigError, match="dense=clearclip"):
        other = ClipEncoder.from_pretrained(str(clip_dir), dense="clearclip")
        DbtrLitModule(clip={}, encoder=other, **common)


def test_disk_cache_keeps_the_affinity(clip_dir, demo_dir, tmp_path):
    from dbtr.data.feature_cache import cached_image_features
    from dbtr.data.images import ClipImageTransform, ImageDataset, read_image_jsonl

    encoder = ClipEncoder.from_pretrained(str(clip_dir), dense="tagclip")
    names = (demo_dir / "classes.txt").read_text().split()
    records = read_image_jsonl(demo_dir / "images", demo_dir / "test.jsonl", names)
    loader = torch.utils.data.DataLoader(ImageDataset(records, ClipImageTransform(32)), batch_size=8)
    features, ok, status = cached_image_features(encoder, loader, tmp_path)
    again, _, hit = cached_image_features(encoder, loader, tmp_path)
    assert (status, hit) == ("built", "hit") and ok.all()
    pixels = torch.stack([loader.dataset[i]["pixel_values"] for i in range(4)])
    want = encoder.encode_image(pixels).patch_affinity
    got = torch.from_numpy(np.asarray(again.patch_affinity[:4], dtype=np.float32))
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-2)  # stored in fp16


def test_train_cli_runs_tagclip_training_free_with_and_without_cached_features(demo_dir, tmp_path):
    runs = {}
    for name, cache in (("pixels", "false"), ("memory", "memory")):
        run_cli(
            "dbtr-train",
            "experiment=tiny_zsclip",
            "model=tagclip",
            f"paths.tiny_dir={demo_dir}",
            f"cache_image_features={cache}",
            f"hydra.run.dir={tmp_path / name}",
            cwd=tmp_path,
        )
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    test = runs["pixels"]["test"]
    assert runs["pixels"]["checkpoint"] is None and "fit_s" not in runs["pixels"]["timings"]
    for key in ("test/mAP", "test/mAP_global", "test/mAP_local"):
        assert 0 < test[key] <= 100, key
    assert runs["pixels"]["config"]["model"]["dense"] == "tagclip"
    assert runs["memory"]["test"]["test/per_class_AP"] == pytest.approx(test["test/per_class_AP"], abs=1e-6)
    assert (tmp_path / "pixels" / "plots" / "heatmaps.png").is_file()


def test_background_rule_on_whole_label_spaces_and_plural_class_names():
    """All 80 COCO names give TagCLIP's COCO list exactly; NUS-WIDE's plural class names (clouds, buildings,
    rocks) remove their singular background words, which would otherwise compete with them in every patch; a
    model's prompt names are what is compared."""
    import json
    from pathlib import Path

    vocab = Path(__file__).resolve().parents[1] / "dbtr" / "text" / "vocabularies" / "taidpt"
    coco = list(json.loads((vocab / "coco2014.json").read_text()))
    assert len(coco) == 80 and background_words(coco, VOC_BACKGROUND) == COCO_BACKGROUND
    kept = background_words(["clouds", "buildings", "rocks", "dog"], VOC_BACKGROUND)
    assert not {"cloud", "building", "rock"} & set(kept) and "sky" in kept
    assert "sky" not in background_words(["heaven"], VOC_BACKGROUND, prompt_names={"heaven": "blue sky"})
