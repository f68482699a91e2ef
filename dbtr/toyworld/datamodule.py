"""The toy world as a LightningDataModule: generated on first use (prepare_data), then read by the real
loaders."""

from __future__ import annotations

import logging
from pathlib import Path

from dbtr.data.datamodule import TextToImageDataModule
from dbtr.toyworld.build import build_toyworld, read_spec, world_spec
from dbtr.toyworld.world import CANVAS, CLASS_NAMES, SIZE_BUCKETS

TOY_MEAN = TOY_STD = (0.5, 0.5, 0.5)  # the toy CLIP was pretrained on pixels scaled to [-1, 1]
# the world's size buckets as box areas on the canvas: small < 5 % <= medium < 20 % <= large
TOY_SIZE_THRESHOLDS = tuple(lower * CANVAS**2 for _, lower in SIZE_BUCKETS[1:])
log = logging.getLogger(__name__)


class ToyWorldDataModule(TextToImageDataModule):
    """Captions for training, 64 px scenes for validation and test; ``root`` is (re)built when missing,
    incomplete, or built with another spec or generator version (the rebuild says why)."""

    def __init__(
        self,
        root: str,
        seed: int = 0,
        num_captions: int = 20000,
        num_val: int = 500,
        num_test: int = 2000,
        **kwargs,
    ):
        root_path = Path(root)
        super().__init__(
            classes=list(CLASS_NAMES),
            train_captions=str(root_path / "captions.jsonl"),
            val_images=str(root_path / "images"),
            val_labels=str(root_path / "val.jsonl"),
            test_images=str(root_path / "images"),
            test_labels=str(root_path / "test.jsonl"),
            mean=TOY_MEAN,
            std=TOY_STD,
            **{"image_size": CANVAS, "size_thresholds": TOY_SIZE_THRESHOLDS, **kwargs},
        )
        self.root = root_path
        self.spec = world_spec(seed, num_captions, num_val, num_test)

    def is_built(self) -> bool:
        return read_spec(self.root) == self.spec

    def stale_reason(self) -> str | None:
        """Why ``root`` does not hold this world (None when it does)."""
        found = read_spec(self.root)
        if found == self.spec:
            return None
        if found is None:
            return "no complete world there" if self.root.exists() else "not built yet"
        if found.get("generator") != self.spec["generator"]:
            old, new = found.get("generator", 1), self.spec["generator"]
            return f"built by generator version {old}, this is version {new}"
        changed = [f"{k} {found.get(k)} -> {v}" for k, v in self.spec.items() if found.get(k) != v]
        return "built with another spec (" + ", ".join(changed) + ")"

    def prepare_data(self) -> None:
        reason = self.stale_reason()
        if reason is not None:
            log.warning("toy world %s: %s; building it", self.root, reason)
            s = self.spec
            build_toyworld(self.root, s["seed"], s["num_captions"], s["num_val"], s["num_test"])
