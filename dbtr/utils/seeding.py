"""Seeds derived from the run seed, so a resumed run draws the same random numbers as an uninterrupted one.

Lightning's checkpoints restore the loops, optimizer and scheduler, but not the global RNG. Everything random
in training is therefore seeded from positions a checkpoint restores exactly, instead of continuing one stream
from the start of the run: the caption order from ``(seed, epoch)`` (:mod:`dbtr.data.sampling`), the global
RNG (caption-feature noise) from ``(seed, global step, batch index, rank)`` before every training step.
"""

from __future__ import annotations

import hashlib
import os


def run_seed() -> int:
    """The seed ``L.seed_everything`` set for this run (it exports it to every DDP process as
    PL_GLOBAL_SEED)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from the parts, stable across processes and Python versions (unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
