"""The embedded default dataset: small synthetic scenes with compositional captions, no download.

Each image holds 1-3 coloured shapes (or a group of 2-3 identical ones) on a plain or textured
background; each caption describes the scene with one of several paraphrase templates, naming
colours, shapes, sizes, counts, positions, relations and the background. Image and text share
only this structure (no class labels), so a dual encoder must learn attribute binding: trained on
thousands of pairs it retrieves far above chance, while a handful of pairs cover too few
combinations. Everything is drawn with numpy from a seed, so a split is the same on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lors.config import EmbeddedConfig

GENERATOR_VERSION = 1
SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}

COLOURS = {
    "red": (220, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 225), "yellow": (245, 220, 40),
    "orange": (245, 140, 30), "purple": (140, 60, 185), "pink": (245, 135, 195), "cyan": (40, 205, 220),
    "brown": (125, 75, 35), "white": (248, 248, 248), "black": (18, 18, 18),
}
BACKGROUNDS = {
    "white": (235, 235, 235), "black": (25, 25, 25), "gray": (128, 128, 128), "beige": (225, 205, 165),
    "navy": (25, 35, 90), "olive": (110, 120, 40),
}
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
TEXTURES = ("plain", "striped", "checkered", "dotted", "grainy")
SIZES = ("small", "large")
SIZE_RADIUS = {"small": 0.085, "large": 0.13}  # fraction of the image side
GRID = (0.2, 0.5, 0.8)  # cell centres along each axis (non-overlapping for both sizes)
COLUMN_WORDS = ("left", "centre", "right")
ROW_WORDS = ("top", "middle", "bottom")
MIN_CONTRAST = 100.0  # RGB distance between a shape's colour and the background
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
SHAPE_PLURALS = {"cross": "crosses"}


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    size: str
    row: int
    col: int

    def noun(self, size: bool = False) -> str:
        words = ([self.size] if size else []) + [self.colour, self.shape]
        return " ".join(words)

    def phrase(self, size: bool = False) -> str:
        noun = self.noun(size)
        return ("an " if noun[0] in "aeiou" else "a ") + noun

    @property
    def place(self) -> str:
        if (self.row, self.col) == (1, 1):
            return "centre"
        if self.row == 1:
            return COLUMN_WORDS[self.col]
        if self.col == 1:
            return ROW_WORDS[self.row]
        return f"{ROW_WORDS[self.row]} {COLUMN_WORDS[self.col]}"


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    background: str
    texture: str
    group: bool  # all things identical: captions count them ("three red circles")


# ---------------------------------------------------------------------------------------- scenes

def _contrasting(background: str) -> list[str]:
    base = np.asarray(BACKGROUNDS[background], dtype=np.float64)
    return [c for c, rgb in COLOURS.items() if np.linalg.norm(np.subtract(rgb, base)) > MIN_CONTRAST]


SHAPE_COLOURS = {background: _contrasting(background) for background in BACKGROUNDS}


def _sample_scene(rng: np.random.Generator) -> Scene:
    background = str(rng.choice(list(BACKGROUNDS)))
    colours = SHAPE_COLOURS[background]
    texture = str(rng.choice(TEXTURES))
    cells = rng.permutation(9)
    if rng.random() < 0.25:
        count = int(rng.integers(2, 4))
        shape, colour, size = str(rng.choice(SHAPES)), str(rng.choice(colours)), str(rng.choice(SIZES))
        things = tuple(Thing(shape, colour, size, int(c) // 3, int(c) % 3) for c in cells[:count])
        return Scene(things, background, texture, group=True)
    count = int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
    things = []
    for c in cells[:count]:
        while True:  # distinct (shape, colour) so every caption identifies each thing
            thing = Thing(str(rng.choice(SHAPES)), str(rng.choice(colours)), str(rng.choice(SIZES)),
                          int(c) // 3, int(c) % 3)
            if all((thing.shape, thing.colour) != (t.shape, t.colour) for t in things):
                break
        things.append(thing)
    return Scene(tuple(things), background, texture, group=False)


# --------------------------------------------------------------------------------------- drawing

def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "cross":
        arm = 0.32 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if shape == "triangle":  # apex up: half-width grows linearly from the apex to the base
        top, bottom = -r, 0.8 * r
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= (dy - top) / (bottom - top) * r)
    raise ValueError(f"unknown shape {shape}")


def _texture_mask(texture: str, side: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:side, 0:side]
    period = max(2, side // 8)
    if texture == "striped":
        return (yy // period) % 2 == 0
    if texture == "checkered":
        return ((yy // period) + (xx // period)) % 2 == 0
    if texture == "dotted":
        return ((yy % (2 * period)) < period // 2 + 1) & ((xx % (2 * period)) < period // 2 + 1)
    if texture == "grainy":
        return rng.random((side, side)) < 0.35
    return np.zeros((side, side), dtype=bool)


def _draw(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render at 2x (small images) and average 2x2 blocks: cheap anti-aliasing."""
    factor = 2 if size < 64 else 1
    side = size * factor
    base = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32)
    shade = base * 0.7 if base.mean() > 90 else base * 0.6 + 60  # texture contrasts with the base
    canvas = np.empty((side, side, 3), dtype=np.float32)
    canvas[:] = base
    canvas[_texture_mask(scene.texture, side, rng)] = shade
    coords = (np.arange(side, dtype=np.float32) + 0.5) / side
    for thing in scene.things:
        jitter = rng.uniform(-0.02, 0.02, size=2)
        dx = coords[None, :] - (GRID[thing.col] + jitter[0])
        dy = coords[:, None] - (GRID[thing.row] + jitter[1])
        canvas[_shape_mask(thing.shape, dx, dy, SIZE_RADIUS[thing.size])] = COLOURS[thing.colour]
    if factor > 1:
        canvas = canvas.reshape(size, factor, size, factor, 3).mean(axis=(1, 3))
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8).transpose(2, 0, 1)


# -------------------------------------------------------------------------------------- captions

def _plural(thing: Thing, count: int, size: bool) -> str:
    shape = SHAPE_PLURALS.get(thing.shape, thing.shape + "s")
    words = [NUMBER_WORDS[count]] + ([thing.size] if size else []) + [thing.colour, shape]
    return " ".join(words)


def _listing(things: list[Thing], size: bool = False) -> str:
    phrases = [t.phrase(size) for t in things]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _relation(a: Thing, b: Thing) -> str:
    if a.col != b.col:
        return "to the left of" if a.col < b.col else "to the right of"
    return "above" if a.row < b.row else "below"


def _background(scene: Scene, rng: np.random.Generator) -> str:
    word = str(rng.choice(["background", "backdrop"]))
    if scene.texture == "plain":
        return f"a plain {scene.background} {word}"
    return f"a {scene.texture} {scene.background} {word}"


def _at(place: str) -> str:
    return "in the centre" if place == "centre" else f"at the {place}"


def _caption(scene: Scene, template: int, rng: np.random.Generator) -> str:
    things = list(scene.things)
    order = [things[i] for i in rng.permutation(len(things))]
    bg = _background(scene, rng)
    if scene.group:
        many = _plural(things[0], len(things), size=template % 2 == 0)
        group_templates = (
            f"{many} on {bg}",
            f"there are {many} in this picture",
            f"{bg} with {many}",
            f"an image showing {many} scattered over {bg}",
            f"{many}, {bg}",
            f"a group of {many.split(' ', 1)[1]}, {NUMBER_WORDS[len(things)]} in total",
        )
        return group_templates[template % len(group_templates)]
    a = order[0]
    b = order[1] if len(order) > 1 else None
    if b is None:
        single_templates = (
            f"{a.phrase()} on {bg}",
            f"{a.phrase(size=True)} {_at(a.place)}",
            f"there is {a.phrase()} {_at(a.place)} of the picture",
            f"{bg} with {a.phrase(size=True)}",
            f"a single {a.noun(size=True)} on {bg}",
            f"an image of one {a.noun()} placed {_at(a.place)}",
        )
        return single_templates[template % len(single_templates)]
    count = NUMBER_WORDS[len(order)]
    multi_templates = (
        f"{_listing(order)} on {bg}",
        f"{a.phrase()} {_relation(a, b)} {b.phrase()}",
        "there is " + " and ".join(f"{t.phrase()} {_at(t.place)}" for t in order),
        f"{count} shapes: {_listing(order, size=True)}",
        f"{bg} with {_listing(order)}",
        f"{a.phrase(size=True)} sits {_relation(a, b)} {b.phrase(size=True)} on {bg}",
    )
    return multi_templates[template % len(multi_templates)]


def _captions(scene: Scene, n: int, rng: np.random.Generator) -> list[str]:
    """`n` captions with distinct templates while they last, so the wordings differ."""
    templates = []
    while len(templates) < n:
        templates.extend(int(t) for t in rng.permutation(6))
    return [_caption(scene, t, rng) for t in templates[:n]]


# ------------------------------------------------------------------------------------------ API

def split_size(cfg: EmbeddedConfig, split: str) -> int:
    return {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}[split]


def generate_split(cfg: EmbeddedConfig, image_size: int, split: str) -> tuple[np.ndarray, list[list[str]]]:
    """Images uint8 (n, 3, S, S) and `captions_per_image` raw captions per image for one split.

    Each split draws from its own stream of the seed, so val/test scenes are not train scenes.
    """
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, SPLIT_STREAMS[split]]))
    n = split_size(cfg, split)
    images = np.empty((n, 3, image_size, image_size), dtype=np.uint8)
    captions = []
    for i in range(n):
        scene = _sample_scene(rng)
        images[i] = _draw(scene, image_size, rng)
        captions.append(_captions(scene, cfg.captions_per_image, rng))
    return images, captions
