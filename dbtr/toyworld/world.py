"""The toy world (v2): procedurally generated scenes with one dominant object and small ones beside it, their
boxes, and captions that, like real ones, name the salient objects and often leave the small ones out.

Classes: 6 colours x 6 shapes, 12 classes, each colour worn by two classes and each shape drawn by two, so
neither colour alone nor shape alone identifies a class (and red/orange/pink/brown, yellow/orange are close).

Scenes (64 x 64 canvas, coordinates in canvas pixels): with probability ``DOMINANT_P`` one large object, then
small and medium ones around or on top of it (drawn later, so they occlude it, as a cup occludes a table).
Object size buckets, by box area as a fraction of the canvas (stated in ``SIZE_BUCKETS``):
small < 5 % (side 9-13 px, at least about one 8 px patch), medium 5-20 %, large >= 20 % (side 32-46 px).

Captions mention an object class with a probability that falls with the size of its largest instance
(``MENTION_P``): text-only labels miss small objects the way COCO-caption labels do.

Everything is deterministic given a seed (numpy Generator). ``render`` draws any square ``view`` of a scene at
any output size, so the CLIP's pre-training can use close-up crops rendered natively (web data holds
close-ups), not blurred up-scalings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CANVAS = 64
GENERATOR_VERSION = 2  # stamped into every world folder; bump when scenes or captions change


@dataclass(frozen=True)
class ToyClass:
    name: str
    colour: str
    rgb: tuple[int, int, int]
    shape: str
    synonyms: tuple[str, ...]  # first = prompt name
    plurals: tuple[str, ...]


_RGB = {
    "red": (205, 35, 30),
    "pink": (235, 120, 170),
    "brown": (140, 85, 40),
    "yellow": (235, 210, 45),
    "green": (60, 170, 50),
    "orange": (240, 130, 25),
}


def _cls(name, colour, shape, synonyms=None, plurals=None) -> ToyClass:
    syn, plu = tuple(synonyms or (name,)), tuple(plurals or (name + "s",))
    return ToyClass(name, colour, _RGB[colour], shape, syn, plu)


# A cycle through the shapes: each colour has two shapes and each shape two colours.
CLASSES: tuple[ToyClass, ...] = (
    _cls("tomato", "red", "circle", plurals=("tomatoes",)),
    _cls("strawberry", "red", "heart", plurals=("strawberries",)),
    _cls("candy", "pink", "heart", ("candy", "sweet"), ("candies", "sweets")),
    _cls("donut", "pink", "ring", ("donut", "doughnut"), ("donuts", "doughnuts")),
    _cls("bagel", "brown", "ring"),
    _cls("croissant", "brown", "moon"),
    _cls("banana", "yellow", "moon"),
    _cls("popcorn", "yellow", "cluster", ("popcorn",), ("popcorn",)),
    _cls("grape", "green", "cluster"),
    _cls("tree", "green", "triangle", ("tree", "fir"), ("trees", "firs")),
    _cls("carrot", "orange", "triangle"),
    _cls("tangerine", "orange", "circle", ("tangerine", "mandarin"), ("tangerines", "mandarins")),
)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)
DISTRACTORS = (
    ("stone", "grey", (128, 128, 128), "circle", "stones"),
    ("cloud", "white", (240, 240, 240), "cloud", "clouds"),
)
BACKGROUNDS = ("dark", "light", "striped", "grassy", "sandy")

# Size buckets by box area / canvas area: (name, lower bound inclusive); also used by the per-size metrics.
SIZE_BUCKETS = (("small", 0.0), ("medium", 0.05), ("large", 0.20))
SIDES = {"small": (9, 13), "medium": (15, 26), "large": (32, 46)}  # box side in canvas pixels (inclusive)
DOMINANT_P = 0.65  # a scene has one large object
MENTION_P = {"large": 0.95, "medium": 0.7, "small": 0.35}  # caption names a class, by its largest instance


def size_bucket(area_fraction: float) -> str:
    name = SIZE_BUCKETS[0][0]
    for bucket, lower in SIZE_BUCKETS:
        if area_fraction >= lower:
            name = bucket
    return name


@dataclass
class ToyObject:
    kind: str  # a class name or a distractor name
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (canvas pixels, inclusive-exclusive)
    rgb: tuple[int, int, int]
    shape: str
    rotation: float = 0.0

    @property
    def area_fraction(self) -> float:
        x0, y0, x1, y1 = self.box
        return (x1 - x0) * (y1 - y0) / CANVAS**2


@dataclass
class Scene:
    objects: list[ToyObject]
    background: str
    seed: int
    labels: list[str] = field(default_factory=list)  # class names present, in class order


def sample_scene(rng: np.random.Generator, distractor_p: float = 0.3) -> Scene:
    """One scene: a dominant large object (p = ``DOMINANT_P``) with 1-3 small and 0-1 medium objects, or 1-2
    medium objects with 0-2 small ones; distinct classes, a small class sometimes twice, an optional
    distractor."""
    if rng.random() < DOMINANT_P:
        sizes = ["large"] + ["medium"] * int(rng.random() < 0.4) + ["small"] * int(rng.integers(1, 4))
    else:
        sizes = ["medium"] * int(rng.integers(1, 3)) + ["small"] * int(rng.integers(0, 3))
    classes = rng.choice(len(CLASSES), size=len(sizes), replace=False).tolist()
    plan = [(CLASSES[c], s) for c, s in zip(classes, sizes)]
    if any(s == "small" for s in sizes) and rng.random() < 0.25:  # small things come in groups
        plan.append(next(p for p in plan if p[1] == "small"))
    if rng.random() < distractor_p:
        d = DISTRACTORS[int(rng.integers(len(DISTRACTORS)))]
        plan.append(
            (ToyClass(d[0], d[1], d[2], d[3], (d[0],), (d[4],)), "small" if rng.random() < 0.5 else "medium")
        )
    objects: list[ToyObject] = []
    for cls, bucket in plan:  # large first: later objects are drawn on top of it
        lo, hi = SIDES[bucket]
        for _attempt in range(40):
            side = int(rng.integers(lo, hi + 1))
            x0, y0 = (int(v) for v in rng.integers(0, CANVAS - side + 1, size=2))
            box = (x0, y0, x0 + side, y0 + side)
            # small and medium objects may lie on the large one, not on each other
            if all(_overlap(box, o.box) < 0.2 for o in objects if o.area_fraction < SIZE_BUCKETS[2][1]):
                break
        jitter = rng.integers(-18, 19, size=3)
        colour = tuple(int(np.clip(v + j, 0, 255)) for v, j in zip(cls.rgb, jitter))
        rotation = float(rng.uniform(-0.4, 0.4))
        objects.append(ToyObject(cls.name, box, colour, cls.shape, rotation))
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    present = {o.kind for o in objects}
    labels = [n for n in CLASS_NAMES if n in present]
    return Scene(objects, background, int(rng.integers(2**31)), labels)


def _overlap(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return ix * iy / max(1, smaller)


def _background(rng: np.random.Generator, kind: str, size: int, scale: float) -> np.ndarray:
    base = {"dark": 55, "light": 190, "striped": 120, "grassy": 110, "sandy": 170, "plain": 140}[kind]
    tint = {"grassy": (-20, 25, -25), "sandy": (25, 10, -30)}.get(kind, tuple(rng.integers(-15, 16, size=3)))
    img = np.full((size, size, 3), base, dtype=np.float32) + np.array(tint, dtype=np.float32)
    blobs = rng.normal(0, 14, size=(4, 4, 3)).astype(np.float32)
    img += np.kron(blobs, np.ones((math.ceil(size / 4), math.ceil(size / 4), 1), dtype=np.float32))[
        :size, :size
    ]
    if kind == "striped":
        period = float(rng.integers(6, 12)) * scale
        angle = rng.random() * math.pi
        yy, xx = np.mgrid[0:size, 0:size]
        wave = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
        img += (25 * np.sign(wave))[..., None]
    img += rng.normal(0, 6, size=img.shape)
    return img


def _draw_mask(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, ...], rot: float) -> None:
    """Draw ``shape`` into an 'L' mask (255 = object, 0 = hole) within ``box`` (output pixels)."""
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2

    def poly(points):
        c, s = math.cos(rot), math.sin(rot)
        draw.polygon(
            [(cx + r * (px * c - py * s), cy + r * (px * s + py * c)) for px, py in points], fill=255
        )

    def disc(ox, oy, q, fill=255):
        draw.ellipse(
            (cx + ox * r - q * r, cy + oy * r - q * r, cx + ox * r + q * r, cy + oy * r + q * r), fill=fill
        )

    if shape == "circle":
        disc(0, 0, 1.0)
    elif shape == "ring":
        disc(0, 0, 1.0)
        disc(0, 0, 0.45, fill=0)
    elif shape == "moon":
        disc(0, 0, 1.0)
        disc(0.55 * math.cos(rot), -0.25, 1.0, fill=0)
    elif shape == "heart":
        t = np.linspace(0, 2 * math.pi, 40)
        hx, hy = (
            16 * np.sin(t) ** 3,
            -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)),
        )
        poly(list(zip(hx / 17.0, hy / 17.0)))
    elif shape == "triangle":
        poly([(0, -1.0), (0.8, 0.95), (-0.8, 0.95)])
    elif shape == "cluster":
        for ox, oy in ((-0.45, -0.35), (0.45, -0.35), (0, 0.1), (-0.45, 0.55), (0.45, 0.55), (0, -0.75)):
            disc(ox, oy, 0.42)
    elif shape == "cloud":
        for ox, oy, q in ((-0.4, 0.1, 0.55), (0.35, 0.1, 0.6), (0, -0.25, 0.6)):
            disc(ox, oy, q)
    else:  # pragma: no cover - guarded by the class table
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int = CANVAS, view: tuple[float, float, float] | None = None) -> Image.Image:
    """The scene as an RGB image of ``size`` px; ``view = (x0, y0, side)`` renders that square of the canvas
    (a close-up), drawn at full resolution."""
    x0v, y0v, side = view or (0.0, 0.0, float(CANVAS))
    scale = size / side
    rng = np.random.default_rng(scene.seed)
    image = Image.fromarray(np.clip(_background(rng, scene.background, size, scale), 0, 255).astype(np.uint8))
    for obj in scene.objects:
        box = tuple((v - o) * scale for v, o in zip(obj.box, (x0v, y0v, x0v, y0v)))
        if box[2] <= 0 or box[3] <= 0 or box[0] >= size or box[1] >= size:
            continue
        mask = Image.new("L", (size, size), 0)
        _draw_mask(ImageDraw.Draw(mask), obj.shape, box, obj.rotation)
        shade = rng.integers(-12, 13)  # a little per-object lighting
        image.paste(tuple(int(np.clip(v + shade, 0, 255)) for v in obj.rgb), (0, 0), mask)
    return image.filter(ImageFilter.GaussianBlur(0.4 * scale**0.5))


def render_array(scene: Scene, size: int = CANVAS, view=None) -> np.ndarray:
    return np.asarray(render(scene, size, view), dtype=np.uint8)


def visible_objects(
    scene: Scene, view: tuple[float, float, float], min_inside: float = 0.6
) -> list[tuple[ToyObject, float]]:
    """Objects with at least ``min_inside`` of their box inside the square ``view``, with their area
    fraction of the view."""
    x0v, y0v, side = view
    out = []
    for o in scene.objects:
        x0, y0, x1, y1 = o.box
        ix = max(0.0, min(x1, x0v + side) - max(x0, x0v))
        iy = max(0.0, min(y1, y0v + side) - max(y0, y0v))
        area = (x1 - x0) * (y1 - y0)
        if ix * iy >= min_inside * area:
            out.append((o, ix * iy / side**2))
    return out


# ---------------------------------------------------------------------------------------------- captions
_COUNTS = {2: ("two", "2", "a pair of", "a couple of"), 3: ("three", "3", "several")}
_OPENERS = (
    "a photo of {}.",
    "a picture of {}.",
    "there is {} in the image.",
    "this image shows {}.",
    "{}.",
    "an image with {}.",
    "i can see {} here.",
    "a snapshot of {}.",
    "look at {}!",
    "a close-up of {}.",
    "{} on a {bg} background.",
    "a photo of {} on a {bg} background.",
    "a drawing of {}.",
    "a scene with {}.",
)
_JOINERS = (" and ", " next to ", " beside ", " together with ", ", ", " near ", " with ")


def _phrase(rng: np.random.Generator, name: str, count: int, colour: str | None, synonyms, plurals) -> str:
    idx = int(rng.integers(len(synonyms)))
    adj = f"{colour} " if colour else ""
    if count == 1:
        word = synonyms[idx]
        article = "an" if (adj or word)[0] in "aeiou" else "a"
        return f"{article} {adj}{word}"
    counts = _COUNTS[min(count, 3)]
    return f"{counts[int(rng.integers(len(counts)))]} {adj}{plurals[idx]}"


def caption_for(
    rng: np.random.Generator,
    scene: Scene,
    colour_p: float = 0.5,
    distractor_p: float = 0.5,
    view: tuple[float, float, float] | None = None,
) -> tuple[str, list[str]]:
    """A varied English caption of ``scene`` (or of the close-up ``view``); returns (text, class names the
    caption mentions). A class is named with ``MENTION_P`` of its largest visible instance's size bucket,
    the largest object always; phrases mostly run from large to small, as people describe scenes."""
    seen = visible_objects(scene, view or (0.0, 0.0, float(CANVAS)))
    groups: dict[str, list[float]] = {}
    for obj, frac in seen:
        groups.setdefault(obj.kind, []).append(frac)
    table = {c.name: c for c in CLASSES}
    ranked = sorted(groups, key=lambda k: -max(groups[k]))
    items = []  # (size, phrase, class name or None)
    for rank, kind in enumerate(ranked):
        count, frac = len(groups[kind]), max(groups[kind])
        if kind in table:
            if rank > 0 and rng.random() >= MENTION_P[size_bucket(frac)]:
                continue  # captions leave (mostly small) objects out
            c = table[kind]
            colour = c.colour if rng.random() < colour_p else None
            items.append((frac, _phrase(rng, kind, count, colour, c.synonyms, c.plurals), kind))
        elif rng.random() < distractor_p * MENTION_P[size_bucket(frac)]:
            d = next(d for d in DISTRACTORS if d[0] == kind)
            items.append(
                (
                    frac,
                    _phrase(rng, kind, count, d[1] if rng.random() < 0.5 else None, (d[0],), (d[4],)),
                    None,
                )
            )
    if not any(k for _, _, k in items):  # the largest object was a distractor: name the largest class too
        first = next(k for k in ranked if k in table)
        c = table[first]
        items.append(
            (max(groups[first]), _phrase(rng, first, len(groups[first]), None, c.synonyms, c.plurals), first)
        )
    if rng.random() < 0.7:
        items.sort(key=lambda t: -t[0])
    else:
        items = [items[i] for i in rng.permutation(len(items))]
    body = items[0][1]
    for _, phrase, _ in items[1:]:
        body += _JOINERS[int(rng.integers(len(_JOINERS)))] + phrase
    opener = _OPENERS[int(rng.integers(len(_OPENERS)))]
    text = opener.replace("{bg}", scene.background).format(body)
    mentioned = {k for _, _, k in items if k}
    return text, [n for n in CLASS_NAMES if n in mentioned]


def closeup_view(
    rng: np.random.Generator, scene: Scene, zoom: tuple[float, float] = (1.2, 2.0)
) -> tuple[float, float, float]:
    """A square close-up around one class object (small and medium ones preferred), ``zoom`` x its box."""
    names = set(CLASS_NAMES)
    objects = [o for o in scene.objects if o.kind in names]
    weights = np.array([1.0 if o.area_fraction < SIZE_BUCKETS[2][1] else 0.4 for o in objects])
    obj = objects[int(rng.choice(len(objects), p=weights / weights.sum()))]
    x0, y0, x1, y1 = obj.box
    side = (x1 - x0) * float(rng.uniform(*zoom))
    cx, cy = (x0 + x1) / 2 + rng.uniform(-0.15, 0.15) * side, (y0 + y1) / 2 + rng.uniform(-0.15, 0.15) * side
    return (cx - side / 2, cy - side / 2, side)
