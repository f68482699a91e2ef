"""The toy world: procedurally generated scenes of fruit-like objects, their boxes, and captions about them.

Classes are defined mainly by colour, with shape as the second cue: four colours carry two classes each that
differ only in shape (tomato/strawberry, banana/lemon, tangerine/carrot, lime/leaf), four colours one class
each, and colours are confusable (red/orange/brown, pink/purple, yellow/orange). A CPU-trained tiny CLIP
learns colour in minutes but shape slowly, so zero-shot recognition is well above chance and well below 100.
Distractor objects (grey stones, white clouds) appear in images and sometimes in captions but are no class.

Everything is deterministic given a seed (numpy Generator), and fast: rendering is PIL on 64 x 64 canvases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


@dataclass(frozen=True)
class ToyClass:
    name: str
    colour: str
    rgb: tuple[int, int, int]
    shape: str
    synonyms: tuple[str, ...]  # first = prompt name
    plurals: tuple[str, ...]


CLASSES: tuple[ToyClass, ...] = (
    ToyClass("tomato", "red", (205, 35, 30), "circle", ("tomato",), ("tomatoes",)),
    ToyClass("strawberry", "red", (205, 35, 30), "heart", ("strawberry",), ("strawberries",)),
    ToyClass("banana", "yellow", (235, 210, 45), "moon", ("banana",), ("bananas",)),
    ToyClass("lemon", "yellow", (235, 210, 45), "circle", ("lemon",), ("lemons",)),
    ToyClass(
        "tangerine",
        "orange",
        (240, 130, 25),
        "circle",
        ("tangerine", "mandarin"),
        ("tangerines", "mandarins"),
    ),
    ToyClass("carrot", "orange", (240, 130, 25), "triangle", ("carrot",), ("carrots",)),
    ToyClass("lime", "green", (60, 170, 50), "circle", ("lime",), ("limes",)),
    ToyClass("leaf", "green", (60, 170, 50), "diamond", ("leaf",), ("leaves",)),
    ToyClass("grape", "purple", (125, 45, 150), "cluster", ("grape",), ("grapes",)),
    ToyClass("blueberry", "blue", (40, 70, 200), "cluster", ("blueberry",), ("blueberries",)),
    ToyClass("donut", "pink", (235, 120, 170), "ring", ("donut", "doughnut"), ("donuts", "doughnuts")),
    ToyClass("cookie", "brown", (140, 85, 40), "circle", ("cookie", "biscuit"), ("cookies", "biscuits")),
)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)
DISTRACTORS = (
    ("stone", "grey", (128, 128, 128), "circle", "stones"),
    ("cloud", "white", (240, 240, 240), "cloud", "clouds"),
)
BACKGROUNDS = ("dark", "light", "striped", "grassy", "sandy", "plain")


@dataclass
class ToyObject:
    kind: str  # a class name or a distractor name
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (pixels, inclusive-exclusive)
    rgb: tuple[int, int, int]
    shape: str


@dataclass
class Scene:
    objects: list[ToyObject]
    background: str
    seed: int
    labels: list[str] = field(default_factory=list)  # class names present, in class order


def sample_scene(
    rng: np.random.Generator, size: int = 64, max_classes: int = 3, distractor_p: float = 0.3
) -> Scene:
    """1..max_classes distinct classes, 1-2 instances each, plus an optional distractor, with limited
    overlap."""
    k = int(rng.integers(1, max_classes + 1))
    chosen = sorted(rng.choice(len(CLASSES), size=k, replace=False).tolist())
    kinds: list[tuple[str, tuple[int, int, int], str]] = []
    for ci in chosen:
        c = CLASSES[ci]
        for _ in range(1 + int(rng.random() < 0.25)):
            kinds.append((c.name, c.rgb, c.shape))
    if rng.random() < distractor_p:
        d = DISTRACTORS[int(rng.integers(len(DISTRACTORS)))]
        kinds.append((d[0], d[2], d[3]))
    objects: list[ToyObject] = []
    for kind, rgb, shape in kinds:
        for _attempt in range(30):
            r = int(rng.integers(size // 9, size // 5 + 1))
            cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
            box = (cx - r, cy - r, cx + r, cy + r)
            if all(_overlap(box, o.box) < 0.25 for o in objects):
                break
        jitter = rng.integers(-18, 19, size=3)
        colour = tuple(int(np.clip(v + j, 0, 255)) for v, j in zip(rgb, jitter))
        objects.append(ToyObject(kind, box, colour, shape))
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    labels = [CLASS_NAMES[i] for i in chosen]
    return Scene(objects, background, int(rng.integers(2**31)), labels)


def _overlap(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return ix * iy / max(1, smaller)


def _background(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    base = {"dark": 55, "light": 190, "striped": 120, "grassy": 110, "sandy": 170, "plain": 140}[kind]
    tint = {"grassy": (-20, 25, -25), "sandy": (25, 10, -30)}.get(kind, tuple(rng.integers(-15, 16, size=3)))
    img = np.full((size, size, 3), base, dtype=np.float32) + np.array(tint, dtype=np.float32)
    blobs = rng.normal(0, 14, size=(4, 4, 3)).astype(np.float32)
    img += np.kron(blobs, np.ones((size // 4, size // 4, 1), dtype=np.float32))
    if kind == "striped":
        period = int(rng.integers(6, 12))
        angle = rng.random() * math.pi
        yy, xx = np.mgrid[0:size, 0:size]
        img += (25 * np.sign(np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)))[
            ..., None
        ]
    img += rng.normal(0, 6, size=img.shape)
    return img


def _draw(
    draw: ImageDraw.ImageDraw, obj: ToyObject, rng: np.random.Generator, bg: tuple[int, int, int]
) -> None:
    x0, y0, x1, y1 = obj.box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    fill = obj.rgb
    rot = rng.uniform(-0.4, 0.4)

    def poly(points):
        c, s = math.cos(rot), math.sin(rot)
        draw.polygon(
            [(cx + r * (px * c - py * s), cy + r * (px * s + py * c)) for px, py in points], fill=fill
        )

    if obj.shape == "circle":
        draw.ellipse(obj.box, fill=fill)
    elif obj.shape == "ring":
        draw.ellipse(obj.box, fill=fill)
        q = r * 0.45
        draw.ellipse((cx - q, cy - q, cx + q, cy + q), fill=bg)
    elif obj.shape == "moon":
        draw.ellipse(obj.box, fill=fill)
        dx = r * 0.55
        draw.ellipse((x0 + dx, y0 - r * 0.25, x1 + dx, y1 - r * 0.25), fill=bg)
    elif obj.shape == "heart":
        t = np.linspace(0, 2 * math.pi, 40)
        hx, hy = (
            16 * np.sin(t) ** 3,
            -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)),
        )
        poly(list(zip(hx / 17.0, hy / 17.0)))
    elif obj.shape == "triangle":
        poly([(0, -1.0), (0.55, 0.95), (-0.55, 0.95)])
    elif obj.shape == "diamond":
        poly([(0, -1.0), (0.6, 0), (0, 1.0), (-0.6, 0)])
    elif obj.shape == "cluster":
        q = r * 0.42
        for ox, oy in ((-0.45, -0.35), (0.45, -0.35), (0, 0.1), (-0.45, 0.55), (0.45, 0.55), (0, -0.75)):
            draw.ellipse((cx + ox * r - q, cy + oy * r - q, cx + ox * r + q, cy + oy * r + q), fill=fill)
    elif obj.shape == "cloud":
        for ox, oy, s in ((-0.4, 0.1, 0.55), (0.35, 0.1, 0.6), (0, -0.25, 0.6)):
            q = r * s
            draw.ellipse((cx + ox * r - q, cy + oy * r - q, cx + ox * r + q, cy + oy * r + q), fill=fill)
    else:  # pragma: no cover - guarded by the class table
        raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(scene.seed)
    bg_arr = _background(rng, scene.background, size)
    image = Image.fromarray(np.clip(bg_arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        local = bg_arr[max(0, y0) : y1, max(0, x0) : x1].reshape(-1, 3).mean(0)
        _draw(draw, obj, rng, tuple(int(v) for v in local))
    return image.filter(ImageFilter.GaussianBlur(0.4))


def render_array(scene: Scene, size: int = 64) -> np.ndarray:
    return np.asarray(render(scene, size), dtype=np.uint8)


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
    "here we have {}, nothing else.",
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
    drop_p: float = 0.1,
    distractor_p: float = 0.5,
) -> tuple[str, list[str]]:
    """A varied English caption of ``scene``; returns (text, class names the caption mentions)."""
    by_kind: dict[str, int] = {}
    for obj in scene.objects:
        by_kind[obj.kind] = by_kind.get(obj.kind, 0) + 1
    table = {c.name: c for c in CLASSES}
    phrases, mentioned = [], []
    for kind, count in by_kind.items():
        if kind in table:
            if len(by_kind) > 1 and rng.random() < drop_p:
                continue  # captions leave objects out
            c = table[kind]
            colour = c.colour if rng.random() < colour_p else None
            phrases.append(_phrase(rng, kind, count, colour, c.synonyms, c.plurals))
            mentioned.append(kind)
        elif rng.random() < distractor_p:
            d = next(d for d in DISTRACTORS if d[0] == kind)
            phrases.append(_phrase(rng, kind, count, d[1] if rng.random() < 0.5 else None, (d[0],), (d[4],)))
    if not mentioned:  # every class group dropped: a caption always names at least one class
        first = next(k for k in by_kind if k in table)
        c = table[first]
        phrases.append(_phrase(rng, first, by_kind[first], None, c.synonyms, c.plurals))
        mentioned.append(first)
    order = rng.permutation(len(phrases))
    body = phrases[order[0]]
    for i in order[1:]:
        body += _JOINERS[int(rng.integers(len(_JOINERS)))] + phrases[i]
    opener = _OPENERS[int(rng.integers(len(_OPENERS)))]
    text = opener.replace("{bg}", scene.background).format(body)
    return text, [n for n in CLASS_NAMES if n in mentioned]
