"""Training cost at COCO-caption scale: cached captions, every method of the comparison, one run.

    python benchmarks/bench_coco_scale.py [--captions 118287] [--steps 5] [--prompt-steps 2] [--json out.json]

118,287 synthetic cached captions (COCO 2014 train as TaI-DPT caches them) with COCO-like token counts
(10-21), D 512, the 80 COCO classes, batch 512, read memory-mapped from the on-disk cache as training reads
it. Models are built from conf/model/{taskres_global,dual_noattn,dbtr,taidpt}.yaml on a ViT-B/16-shaped random
CLIP; TaI-DPT runs its 2 x 80 prompts through the 12-layer text tower every step (as it must: its class
embeddings are learned).

Per model: the loader time per epoch (one full epoch of the real train_dataloader), the compute per step
(head, both ranking losses, backward, optimiser step; the median of a few measured steps, projected to the
epoch and to 20 epochs: stated in the output), peak RSS, and the step as a multiple of its arithmetic minimum
(the FLOPs of its unavoidable matmuls at this machine's measured fp32 matmul rate). Ratios come from this one
run: on a shared machine the absolute times are noisy, the ratios much less.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    COCO_CAPTIONS,
    MODELS,
    build_model,
    coco_class_names,
    matmul_gflops,
    random_text_encoder,
    step_min_flops,
    synthetic_caption_cache,
    train_step,
)

from dbtr.data.datamodule import TextToImageDataModule  # noqa: E402


def peak_rss_reset() -> None:
    """Reset this process's peak RSS (Linux: clear_refs 5), so the next reading is the peak since now."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def loader(records, feats, class_names, batch: int, device: torch.device):
    dm = TextToImageDataModule(classes=class_names, batch_size=batch)
    dm.captions = records
    dm.set_caption_features(feats)
    # the one-process view a Trainer gives train_dataloader(); on an accelerator the features move there
    # if they fit
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0, strategy=SimpleNamespace(root_device=device))
    return dm.train_dataloader()


def measure(args) -> dict:
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if args.threads:
        torch.set_num_threads(args.threads)
    class_names = coco_class_names()[: args.classes]
    tmp = tempfile.TemporaryDirectory(prefix="dbtr-coco-bench-")
    start = time.perf_counter()
    dim = 32 if args.tiny else 512
    records, feats = synthetic_caption_cache(tmp.name, args.captions, dim=dim, classes=len(class_names))
    built = time.perf_counter() - start

    loader_ = loader(records, feats, class_names, args.batch, device)
    steps_per_epoch = len(loader_)
    sync()
    start = time.perf_counter()
    batches = []
    for i, b in enumerate(loader_):
        if i < 4:
            batches.append(b)
    sync()
    loader_epoch = time.perf_counter() - start
    gflops = matmul_gflops(device=device, sync=sync)
    n_max = max(int(b["attention_mask"].shape[1]) for b in batches)
    n_mean = statistics.mean(float(b["attention_mask"].shape[1]) for b in batches)

    dtype = getattr(torch, args.dtype)
    encoder = random_text_encoder(class_names, device=device, dtype=dtype, tiny=args.tiny)
    results = {}
    for name in args.models:
        model, optimizer = build_model(name, encoder, class_names)
        model.train()
        steps = args.prompt_steps if model.head.prompts is not None else args.steps
        batch = {k: v.to(device) for k, v in batches[0].items()}
        train_step(model, optimizer, batch)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        peak_rss_reset()
        times = []
        for i in range(steps):
            batch = {k: v.to(device) for k, v in batches[(i + 1) % len(batches)].items()}
            sync()
            t = time.perf_counter()
            train_step(model, optimizer, batch)
            sync()
            times.append(time.perf_counter() - t)
        step = statistics.median(times)
        text_tokens = 0 if model.head.prompts is None else 2 * model.head.prompts.token_ids.numel()
        text = encoder.model.config.text_config
        minimum = step_min_flops(
            name,
            args.batch,
            round(n_mean),
            len(class_names),
            encoder.embed_dim,
            text_tokens,
            (text.hidden_size, text.num_hidden_layers),
        )
        epoch = loader_epoch + steps_per_epoch * step
        results[name] = {
            "measured_steps": steps,
            "step_s": step,
            "compute_epoch_s": steps_per_epoch * step,
            "loader_epoch_s": loader_epoch,
            "epoch_s": epoch,
            "projected_s": args.epochs * epoch,
            "peak_rss_mib": peak_rss_mib(),
            "min_flops": minimum,
            "min_step_s": minimum / (gflops * 1e9),
            "peak_device_mib": torch.cuda.max_memory_allocated(device) / 2**20
            if device.type == "cuda"
            else None,
        }
        del model, optimizer
    return {
        "device": str(device),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "captions": args.captions,
        "batch": args.batch,
        "classes": len(class_names),
        "dim": encoder.embed_dim,
        "steps_per_epoch": steps_per_epoch,
        "epochs": args.epochs,
        "tokens_mean_padded": n_mean,
        "tokens_max": n_max,
        "matmul_gflops": gflops,
        "cache_build_s": built,
        "loader_ms_per_batch": 1000 * loader_epoch / steps_per_epoch,
        "models": results,
    }


def report(r: dict) -> None:
    print(
        f"device={r['device']} threads={r['threads']} captions={r['captions']} batch={r['batch']} "
        f"classes={r['classes']} D={r['dim']} steps/epoch={r['steps_per_epoch']} "
        f"padded tokens/batch ~{r['tokens_mean_padded']:.0f}"
    )
    print(
        f"fp32 matmul rate: {r['matmul_gflops']:.0f} GFLOP/s;  loader: {r['loader_ms_per_batch']:.2f} ms "
        "per batch (one full epoch of train_dataloader, memory-mapped cache)"
    )
    print(
        "compute: the median of a few measured steps, projected to the epoch (loader epoch + steps x step) "
        f"and to {r['epochs']} epochs"
    )
    columns = (
        "model",
        "steps",
        "step ms",
        "x min",
        "loader/ep s",
        "compute/ep s",
        "epoch s",
        "proj. h",
        "RSS MiB",
    )
    widths = (15, 5, 9, 6, 11, 12, 9, 8, 8)
    print(" ".join(f"{c:>{w}s}" for c, w in zip(columns, widths)))
    for name, m in r["models"].items():
        cells = (
            f"{m['measured_steps']:d}",
            f"{1000 * m['step_s']:.1f}",
            f"{m['step_s'] / m['min_step_s']:.1f}",
            f"{m['loader_epoch_s']:.2f}",
            f"{m['compute_epoch_s']:.1f}",
            f"{m['epoch_s']:.1f}",
            f"{m['projected_s'] / 3600:.2f}",
            f"{m['peak_rss_mib']:.0f}",
        )
        print(f"{name:>15s} " + " ".join(f"{c:>{w}s}" for c, w in zip(cells, widths[1:])))
    ms = r["models"]
    if "dbtr" not in ms:
        return
    ref = ms["dbtr"]
    for name, m in ms.items():
        if name != "dbtr":
            step, epoch = m["step_s"] / ref["step_s"], m["epoch_s"] / ref["epoch_s"]
            print(f"{name} / dbtr: step {step:.2f}x, epoch {epoch:.2f}x")
    if "dual_noattn" in ms:
        noattn = ms["dual_noattn"]
        print(
            f"dbtr / dual_noattn step: {ref['step_s'] / noattn['step_s']:.2f}x "
            f"(their arithmetic minima: {ref['min_flops'] / noattn['min_flops']:.2f}x)"
        )
    if "taidpt" in ms:
        ratio = ms["taidpt"]["projected_s"] / ref["projected_s"]
        print(f"HEADLINE taidpt / dbtr, {r['epochs']} epochs: {ratio:.1f}x")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--captions", type=int, default=COCO_CAPTIONS)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--steps", type=int, default=5, help="measured steps per cached-feature model")
    p.add_argument(
        "--prompt-steps", type=int, default=2, help="measured steps of taidpt (text tower every step)"
    )
    p.add_argument("--epochs", type=int, default=20, help="projected run length")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="CLIP (text tower) dtype"
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--tiny", action="store_true", help="toy CLIP (D 32): checks the script runs end to end")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    r = measure(args)
    report(r)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    main()
