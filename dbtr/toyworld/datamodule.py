"""The toy world as a LightningDataModule: generated on first use (prepare_data), then read by the real
loaders."""

from __future__ import annotations

import json
from pathlib import Path

from dbtr.data.datamodule import TextToImageDataModule
from dbtr.toyworld.build import build_toyworld
from dbtr.toyworld.world import CLASS_NAMES
from dbtr.utils.io import atomic_write_json

TOY_MEAN = TOY_STD = (0.5, 0.5, 0.5)  # the toy CLIP was pretrained on pixels scaled to [-1, 1]
WORLD_VERSION = 1  # bump when the generator changes, so stale folders are rebuilt


class ToyWorldDataModule(TextToImageDataModule):
    """Captions for training, 64 px scenes for validation and test; ``root`` is (re)built when missing or
    stale."""

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
            **{"image_size": 64, **kwargs},
        )
        self.root = root_path
        self.spec = {
            "version": WORLD_VERSION,
            "seed": seed,
            "num_captions": num_captions,
            "num_val": num_val,
            "num_test": num_test,
        }

    def is_built(self) -> bool:
        marker = self.root / "world.json"
        return marker.is_file() and json.loads(marker.read_text()) == self.spec

    def prepare_data(self) -> None:
        if not self.is_built():
            s = self.spec
            build_toyworld(self.root, s["seed"], s["num_captions"], s["num_val"], s["num_test"])
            atomic_write_json(self.root / "world.json", self.spec)  # written last: marks a complete build
