"""Helpers shared by the benchmarks: ViT-B/16-sized random CLIP and a timing loop."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def vit_b16_clip(dtype=torch.float32, device="cpu", bos_token_id=49406, eos_token_id=49407):
    """A CLIPModel with ViT-B/16's shapes (random weights: speed does not depend on the values)."""
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=eos_token_id),
        vision_config=dict(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072,
                           num_hidden_layers=12, num_attention_heads=12),
        projection_dim=512,
    )
    torch.manual_seed(0)
    return CLIPModel(cfg).to(device=device, dtype=dtype).eval()


def timeit(fn: Callable[[], object], repeats: int, warmup: int = 1, sync: Callable[[], None] = lambda: None) -> float:
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
