"""Score images with a trained checkpoint: top-k labels per image as JSON lines or CSV, optional heatmaps.

    dbtr-predict ckpt.ckpt photos/                          # -> predictions.jsonl
    dbtr-predict ckpt.ckpt 'shots/*.jpg' a.png -o out.csv -k 3 --heatmaps heat/
    dbtr-predict ckpt.ckpt photos/ --classes "dog,cat,zebra"      # a new vocabulary (zebra: see below)

Unreadable images, and inputs that yield none (a missing file, an empty folder, a pattern matching nothing),
are skipped and listed (summary, ``<output>.skipped.txt``); the exit status is 0 unless no image could be read
(1) or the arguments are wrong (2). The output is checked to be writable before the model is loaded; every
output file is written atomically.
A name the model was not trained on is scored as the model scores any class without training labels: zero
residual (plain T0) for free residuals, g(T0) with a residual generator, the learned shared contexts for
TaI-DPT prompts (``dbtr.system.checkpoint.new_class_rule``); it is reported on stderr and in the summary.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from dbtr.system.checkpoint import LoadedModel
from dbtr.utils.errors import UserError, user_errors

FORMATS = ("jsonl", "csv")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


class UsageError(UserError):
    """Wrong arguments or inputs that make the whole run pointless (exit status 2)."""


def parse_class_list(spec: str) -> list[str]:
    """``--classes``: a text file (one name per line) if such a file exists, else a comma-separated list."""
    from dbtr.data.labels import load_class_names
    from dbtr.text.names import validate_class_names

    path = Path(spec).expanduser()
    if path.is_file():
        return load_class_names(path)
    if path.suffix.lower() in (".txt", ".lst") or os.sep in spec:
        raise FileNotFoundError(
            f"class list file not found: {path} (or give the names comma-separated: 'dog,cat')"
        )
    return validate_class_names(spec.split(","), source=f"class list {spec!r}")


def collect_images(specs: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files, folders (searched recursively for image suffixes) and glob patterns -> (candidates, missing).

    A name that is not there, a folder without images and a pattern that matches nothing are each listed in
    ``missing`` with the reason (reported and counted as skipped): one empty input does not stop the run."""
    found: list[Path] = []
    missing: list[tuple[str, str]] = []
    suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
    for spec in specs:
        if glob.has_magic(spec):
            matches = [Path(p) for p in sorted(glob.glob(spec, recursive=True)) if Path(p).is_file()]
            if not matches:
                missing.append((spec, "the pattern matches no file (quote it: the shell must not expand it)"))
            found += matches
        elif Path(spec).is_dir():
            files = sorted(
                p for p in Path(spec).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            )
            if not files:
                missing.append((spec, f"the folder holds no image file ({suffixes})"))
            found += files
        elif Path(spec).is_file():
            found.append(Path(spec))
        else:
            missing.append((spec, "no such file or folder"))
    unique = list(dict.fromkeys(found))  # the same file named twice is scored once
    return unique, missing


def check_output(output: str) -> None:
    """Refuse an output file that cannot be written, before the model is loaded and every image scored.

    The file's folder must exist or be creatable (its nearest existing ancestor is a folder) and accept a new
    file: a test file is created there and removed, which also catches read-only file systems and, unlike
    permission bits, holds for root."""
    import errno
    import tempfile

    from dbtr.utils.io import AtomicWriteError

    if output == "-":
        return
    out = Path(output)
    if out.is_dir():
        raise AtomicWriteError(errno.EISDIR, "it is a folder (give a file name)", str(out))
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise AtomicWriteError(errno.ENOTDIR, f"{folder} is a file, not a folder", str(out))
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise AtomicWriteError(err.errno or errno.EIO, err.strerror or str(err), str(out)) from None


def read_image(path: Path) -> Image.Image:
    from dbtr.data.images import load_image

    return load_image(path)  # ImageDecodeError (an OSError) naming the file, also for decompression bombs


def output_format(output: str, fmt: str | None) -> str:
    if fmt:
        return fmt
    return "csv" if output.lower().endswith(".csv") else "jsonl"


def render(records: list[dict], fmt: str) -> str:
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", "rank", "label", "score"])
    for r in records:
        for rank, t in enumerate(r["top"], start=1):
            writer.writerow([r["image"], rank, t["label"], f"{t['score']:.6g}"])
    return buf.getvalue()


def heatmap_name(path: Path, used: set[str]) -> str:
    name, n = f"{path.stem}.png", 1
    while name in used:  # same stem in two folders
        n += 1
        name = f"{path.stem}_{n}.png"
    used.add(name)
    return name


def predict(
    loaded: LoadedModel, paths: Sequence[Path], top_k: int, batch_size: int = 32, heatmaps: Path | None = None
) -> tuple[list[dict], list[tuple[str, str]]]:
    """Top-k records of the readable images, in input order, and the (path, reason) of the unreadable ones."""
    from dbtr.system.viz import heatmap_figure, save_figure, top_panels

    names = loaded.class_names
    records, skipped, used = [], [], set()
    for start in range(0, len(paths), batch_size):
        batch, images = [], []
        for path in paths[start : start + batch_size]:
            try:
                images.append(read_image(path))
                batch.append(path)
            except OSError as err:
                skipped.append((str(path), str(err)))
        if not batch:
            continue
        scores, attention = loaded.score(images)
        top = scores.topk(top_k, dim=1)
        for i, path in enumerate(batch):
            record = {
                "image": str(path),
                "top": [
                    {"label": names[c], "score": round(float(s), 6)}
                    for s, c in zip(top.values[i].tolist(), top.indices[i].tolist())
                ],
            }
            if heatmaps is not None and attention is not None:
                panels = top_panels(names, scores[i].numpy(), attention[i].numpy(), k=top_k)
                fig = heatmap_figure([(loaded.transform.crop(images[i]), panels)], title=path.name)
                record["heatmap"] = str(save_figure(fig, heatmaps / heatmap_name(path, used)))
            records.append(record)
    return records, skipped


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dbtr-predict",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("checkpoint", help="a .ckpt written by dbtr-train")
    p.add_argument("images", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    p.add_argument(
        "-o",
        "--output",
        default="predictions.jsonl",
        help="output file; '-' writes to stdout (default: predictions.jsonl)",
    )
    p.add_argument(
        "--format", choices=FORMATS, default=None, help="default: csv if the output ends in .csv, else jsonl"
    )
    p.add_argument(
        "-k", "--top-k", type=int, default=5, help="labels per image (default 5; at most the class count)"
    )
    p.add_argument(
        "--clip", default=None, help="CLIP folder or hub id (default: the one recorded in the checkpoint)"
    )
    p.add_argument(
        "--classes",
        default=None,
        help="replace the vocabulary: a text file (one name per line) or 'name1,name2,...'; names the model "
        "was not trained on are scored like any class without labels (zero residual = plain zero-shot "
        "T0; residual generator g(T0); TaI-DPT: the shared learned prompts)",
    )
    p.add_argument(
        "--heatmaps",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write one PNG per image: the local branch's attention for each of its top-k classes",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument(
        "--allow-mismatch",
        action="store_true",
        help=(
            "score even if --clip is not the CLIP the checkpoint was trained on "
            "(a warning instead of an error)"
        ),
    )
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from dbtr.system.checkpoint import load_checkpoint
    from dbtr.utils.io import atomic_write_json, atomic_write_text

    if args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.top_k}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    fmt = output_format(args.output, args.format)
    paths, skipped = collect_images(args.images)
    if not paths:
        raise UsageError("no image to score: " + "; ".join(f"{p}: {why}" for p, why in skipped))
    check_output(args.output)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    classes = parse_class_list(args.classes) if args.classes else None
    loaded = load_checkpoint(
        args.checkpoint, clip=args.clip, classes=classes, device=device, allow_mismatch=args.allow_mismatch
    )
    top_k = min(args.top_k, len(loaded.class_names))
    records, unreadable = predict(loaded, paths, top_k, args.batch_size, args.heatmaps)
    skipped += unreadable

    to_stdout = args.output == "-"
    if records:
        if to_stdout:
            sys.stdout.write(render(records, fmt))
        else:
            atomic_write_text(args.output, render(records, fmt))
    say = lambda msg: print(msg, file=sys.stderr)  # noqa: E731  (stdout may carry the predictions)
    say(
        f"dbtr-predict: scored {len(records)} of {len(records) + len(skipped)} image(s), top-{top_k} of "
        f"{len(loaded.class_names)} classes"
        + ("" if to_stdout or not records else f" -> {args.output} ({fmt})")
    )
    if skipped:
        say(f"skipped {len(skipped)} missing or unreadable image(s):")
        for path, why in skipped:
            say(f"  {path}: {why}")
    if loaded.new_classes:
        say(f"classes not trained on, scored with {loaded.new_class_rule}: {', '.join(loaded.new_classes)}")
    if args.heatmaps is not None and records and "heatmap" not in records[0]:
        say("no heatmaps: this model has no local branch (use_local=false)")
    if not to_stdout:
        out = Path(args.output)
        skipped_file = out.with_name(out.name + ".skipped.txt")
        if skipped:
            atomic_write_text(skipped_file, "".join(f"{p}\t{why}\n" for p, why in skipped))
            say(f"skipped list -> {skipped_file}")
        else:
            skipped_file.unlink(missing_ok=True)  # a stale list from an earlier run would mislead
        if records:
            atomic_write_json(
                out.with_name(out.name + ".summary.json"),
                {
                    "checkpoint": loaded.checkpoint,
                    "clip": loaded.clip,
                    "output": str(out),
                    "format": fmt,
                    "top_k": top_k,
                    "classes": loaded.class_names,
                    "new_classes": loaded.new_classes,
                    "new_class_rule": loaded.new_class_rule,
                    "num_scored": len(records),
                    "skipped": [{"image": p, "reason": why} for p, why in skipped],
                },
            )
    if not records:
        say("dbtr-predict: error: no readable image; nothing written")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per run is noise in a CLI
    with user_errors(
        "dbtr-predict"
    ):  # one message and exit status 2 for a user error; DBTR_TRACEBACK=1: the trace
        return run(args)


if __name__ == "__main__":
    sys.exit(main())
