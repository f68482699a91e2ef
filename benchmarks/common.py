"""Helpers shared by the benchmarks: ViT-B/16-sized random CLIP and a timing loop."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def vit_b16_clip(
    dtype=torch.float32, device="cpu", bos_token_id=49406, eos_token_id=49407, tiny: bool = False
):
    """A CLIPModel with ViT-B/16's shapes (random weights: speed does not depend on the values); ``tiny``: the
    same layout at toy sizes (2 layers, width 32, 32 px), for checking a benchmark runs end to end."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(
        vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8
    )
    vision = dict(
        image_size=224,
        patch_size=16,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
    )
    if tiny:
        text = dict(
            vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
        )
        vision = dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        )
    cfg = CLIPConfig(
        text_config=dict(
            **text,
            max_position_embeddings=77,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=eos_token_id,
        ),
        vision_config=vision,
        projection_dim=32 if tiny else 512,
    )
    torch.manual_seed(0)
    return CLIPModel(cfg).to(device=device, dtype=dtype).eval()


def timeit(
    fn: Callable[[], object], repeats: int, warmup: int = 1, sync: Callable[[], None] = lambda: None
) -> float:
    """Median seconds of ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ------------------------------------------------------------------ COCO-scale cached-caption training
COCO_CAPTIONS, COCO_TOKENS = (
    118_287,
    (10, 21),
)  # COCO 2014 train captions (as TaI-DPT caches them), token lengths
MODELS = ("taskres_global", "dual_noattn", "dbtr", "taidpt")
CONF_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model"


def model_config(name: str) -> dict:
    """conf/model/<name>.yaml with its ``defaults`` (same-group files) merged in, as Hydra composes it."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(CONF_MODEL / f"{name}.yaml"), resolve=False)
    defaults = raw.pop("defaults", [])
    merged = OmegaConf.create()
    for entry in (
        defaults if "_self_" in defaults else [*defaults, "_self_"]
    ):  # Hydra: _self_ last unless placed
        merged = OmegaConf.merge(merged, raw if entry == "_self_" else model_config(entry))
    return OmegaConf.to_container(merged, resolve=False)


def synthetic_caption_cache(
    folder, n: int, dim: int = 512, classes: int = 80, tokens=COCO_TOKENS, seed: int = 0
):
    """``n`` random normalised captions with COCO-like token counts, written as the on-disk feature cache and
    read back memory-mapped (as training reads it); labels: 1-3 positives per caption, the rest negative."""
    import numpy as np

    from dbtr.data.captions import CaptionFeatures, CaptionRecords
    from dbtr.data.feature_cache import load_caption_features, save_caption_features

    rng = np.random.default_rng(seed)
    lengths = rng.integers(tokens[0], tokens[1] + 1, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    def unit(rows: int) -> np.ndarray:
        out = np.empty((rows, dim), np.float16)
        for s in range(0, rows, 1 << 16):  # in slices: fp32 scratch stays small
            x = rng.standard_normal((min(1 << 16, rows - s), dim), dtype=np.float32)
            out[s : s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    feats = CaptionFeatures(unit(n), unit(int(offsets[-1])), offsets)
    save_caption_features(Path(folder) / "captions-bench", feats, "bench")
    del feats
    labels = np.full((n, classes), -1, np.int8)
    for k in (1, 2, 3):
        rows = rng.random(n) < 1 / k
        labels[rows, rng.integers(0, classes, size=int(rows.sum()))] = 1
    labels[np.arange(n), rng.integers(0, classes, size=n)] = 1
    records = CaptionRecords([""] * n, labels)
    return records, load_caption_features(Path(folder) / "captions-bench", "bench", verify=False)


def coco_class_names() -> list[str]:
    from dbtr.data.corpus import resolve_vocabulary

    return list(resolve_vocabulary("coco2014").class_names)


def synthetic_captions(class_names, n: int, seed: int = 0) -> list[str]:
    """COCO-caption-like sentences naming one to three of the classes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [
        " and ".join(
            f"a {class_names[c]} next to the {class_names[rng.integers(len(class_names))]} on the street"
            for c in rng.choice(len(class_names), size=rng.integers(1, 4), replace=False)
        )
        for _ in range(n)
    ]


def random_text_encoder(class_names, device="cpu", dtype=torch.float32, tiny: bool = False):
    """A ClipEncoder on ViT-B/16-shaped random weights, with a small BPE tokenizer trained on the class
    names."""
    from dbtr.models.clip import ClipEncoder
    from dbtr.models.tiny import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(
        [f"a photo of a {n}." for n in class_names] + synthetic_captions(class_names, 200), vocab_size=600
    )
    model = vit_b16_clip(
        dtype, device, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tiny=tiny
    )
    return ClipEncoder(model, tokenizer, dense="clearclip")


def build_model(name: str, encoder, class_names):
    """The LightningModule of conf/model/<name>.yaml on ``encoder``, with T0 built, and its optimiser."""
    from dbtr.system.lit_module import DbtrLitModule

    cfg = model_config(name)
    model = DbtrLitModule(
        clip={"name_or_path": "random-vit-b16"},
        class_names=class_names,
        head=cfg["head"],
        templates="simple",
        loss=cfg["loss"],
        loss_kwargs=cfg.get("loss_kwargs"),
        prompts=cfg.get("prompts"),
        encoder=encoder,
    )
    model.to(encoder.device)
    model.ensure_class_embeddings()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = cfg["optimizer"]
    if opt["name"] == "sgd":
        optimizer = torch.optim.SGD(
            params, lr=opt["lr"], momentum=opt["momentum"], weight_decay=opt["weight_decay"]
        )
    else:
        optimizer = torch.optim.Adam(params, lr=opt["lr"], weight_decay=opt["weight_decay"])
    return model, optimizer


def train_step(model, optimizer, batch) -> None:
    """One training step as DbtrLitModule.training_step runs it (head, both ranking losses, backward,
    update)."""
    g, loc, mask, modality, _ = model.features(batch)  # no head here reads the patch affinity
    out = model.head(g, loc, mask, modality=modality, bases=model.branch_bases())
    loss = sum(model.branch_losses(out, batch["labels"]).values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def matmul_gflops(size: int = 2048, device="cpu", dtype=torch.float32, sync=lambda: None) -> float:
    """This machine's rate on a large square matmul, GFLOP/s."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    seconds = timeit(lambda: a @ b, repeats=5, sync=sync)
    return 2 * size**3 / seconds / 1e9


def step_min_flops(
    name: str, b: int, n: int, c: int, d: int, text_tokens: int = 0, tower: tuple[int, int] = (512, 12)
) -> float:
    """FLOPs of the matmuls a training step cannot avoid (docs/method.md §3; features frozen, so no gradient
    w.r.t. them): one unit ``u = 2 b n c d`` per (B, N, C, D) product.

    global logits f_g T_g^T: 2bcd forward + 2bcd for dT_g (when trained); local similarities F T_l^T: u + u;
    PFA per branch: its own similarities (global branch; the local one shares F T_l^T) u + u, the max-pooled
    mix W_cl T_b u forward, 2u backward (dW_cl, dT_b). TaI-DPT adds the text tower (``tower`` = width, layers)
    on its 2C prompts, forward and the activation gradients back to the contexts: 2 x 2 x 12 W^2 x layers per
    token (``text_tokens`` = 2C x length; the attention scores over ~20 tokens are left out).
    """
    full = model_config(name)
    cfg, prompts = full["head"], full.get("prompts") is not None  # learned prompts: T_g, T_l get gradients
    u, small = 2.0 * b * n * c * d, 2.0 * b * c * d
    trained_g, trained_l = cfg["global_residual"] or prompts, cfg["local_residual"] or prompts
    flops = small * (1 + trained_g)
    if cfg["use_local"]:
        flops += u * (1 + trained_l)
    pfa = cfg["pfa"]
    if pfa in ("global", "both"):
        flops += u * (1 + trained_g) + u * (1 + 2 * trained_g)
    if pfa in ("local", "both"):
        flops += u * (1 + 2 * trained_l)
    if text_tokens:
        width, layers = tower
        flops += 2 * 2 * text_tokens * layers * 12 * width * width
    return flops
