"""Synthetic shapes benchmark: 336x336 scenes of coloured shapes, one-word questions, dense per-patch labels.

A scene puts 3 to 6 objects (circle, square or triangle; one of six colours) into distinct cells of a 3x3 grid, at a
random offset and size; about 40% are small (16-26 px, one to four 14-px patches), so that dropping a few patches
can lose them. Questions have one-word answers of three kinds:

- existence (POPE-style, "Is there a red object in the image?"): answers balanced yes/no; most negatives are
  adversarial (a colour next on the hue wheel to one in the scene: orange beside red or yellow); a scene that
  shows all six colours (about 1 in 60) is asked about an absent (colour, shape) pair instead;
- colour at a named position ("What color is the object in the top left?");
- shape at a named position ("What shape is the object in the center?").

Everything is deterministic: scene ``i`` of split ``s`` comes from ``random.Random(f"{seed}/{s}/{i}")``, so the
``train`` and ``test`` splits draw from disjoint seed streams. The generator also returns what a ViT needs for
dense supervision: for each of the 24x24 patches the (colour, shape) class of the object covering it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SIZE = 336  # LLaVA-1.5's input resolution: no resizing before the vision tower
PATCH = 14
GRID = SIZE // PATCH  # 24 x 24 = 576 patch tokens
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (240, 210, 40), "purple": (140, 60, 180), "orange": (245, 140, 30)}
COLOUR_NAMES = tuple(COLOURS)
HUE_WHEEL = ("red", "orange", "yellow", "green", "blue", "purple")  # neighbours are the hard negatives
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top middle", "top right", "middle left", "center", "middle right",
             "bottom left", "bottom middle", "bottom right")  # the 3x3 cells in raster order
BACKGROUND = (235, 235, 235)
CELL = SIZE // 3
SMALL, LARGE = (16, 26), (30, 60)  # object side ranges, pixels
MIN_PATCH_PIXELS = 16  # a patch is labelled with an object that covers at least this many of its 196 pixels
KINDS = ("yes", "no", "color", "shape")  # question kinds, cycled in the test split
N_CLASSES = 1 + len(COLOURS) * len(SHAPES)  # per-patch classes: 0 background, then (colour, shape) pairs


def joint_class(colour: str, shape: str) -> int:
    return 1 + COLOUR_NAMES.index(colour) * len(SHAPES) + SHAPES.index(shape)


@dataclass
class Obj:
    shape: str
    colour: str
    cell: int  # index into POSITIONS
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)

    @property
    def small(self) -> bool:
        return self.box[2] - self.box[0] <= SMALL[1]


@dataclass
class Scene:
    image: Image.Image
    objects: list[Obj]
    patch_object: np.ndarray  # [576] index into objects of the object covering each patch, -1 for background
    patch_mask: np.ndarray | None = None  # [576, 49] object coverage of each patch's 7x7 blocks of 2x2 pixels
    patch_class: np.ndarray = field(init=False)  # [576] joint (colour, shape) class, 0 for background

    def __post_init__(self):
        classes = np.array([0] + [joint_class(o.colour, o.shape) for o in self.objects])
        self.patch_class = classes[self.patch_object + 1]


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)


def make_scene(rng: random.Random) -> Scene:
    objects = []
    for cell in sorted(rng.sample(range(9), rng.randint(3, 6))):
        side = rng.randint(*SMALL) if rng.random() < 0.4 else rng.randint(*LARGE)
        cx, cy = (cell % 3) * CELL, (cell // 3) * CELL
        x0, y0 = cx + rng.randint(4, CELL - side - 4), cy + rng.randint(4, CELL - side - 4)
        objects.append(Obj(rng.choice(SHAPES), rng.choice(COLOUR_NAMES), cell, (x0, y0, x0 + side, y0 + side)))
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    mask = Image.new("L", (SIZE, SIZE), 0)
    draw, mask_draw = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for k, obj in enumerate(objects):
        _draw(draw, obj.shape, obj.box, COLOURS[obj.colour])
        _draw(mask_draw, obj.shape, obj.box, k + 1)
    ids = np.asarray(mask).reshape(GRID, PATCH, GRID, PATCH).transpose(0, 2, 1, 3).reshape(GRID * GRID, -1)
    counts = np.stack([(ids == k + 1).sum(1) for k in range(len(objects))], 1)  # [576, n_objects]
    patch_object = np.where(counts.max(1) >= MIN_PATCH_PIXELS, counts.argmax(1), -1)
    covered = (ids > 0).reshape(GRID * GRID, 7, 2, 7, 2).mean((2, 4)).reshape(GRID * GRID, 49)
    return Scene(image, objects, patch_object, covered.astype(np.float32))


def make_question(scene: Scene, kind: str, rng: random.Random) -> dict:
    """One question of `kind` ("yes", "no", "color", "shape") about `scene`: question, answer, category, whether
    it is about a small object, and `targets`: the indices of the objects the answer rests on (none for "no")."""
    objs = scene.objects
    if kind == "yes":
        colour = rng.choice(objs).colour
        targets = [k for k, o in enumerate(objs) if o.colour == colour]
        return {"question": f"Is there a {colour} object in the image?", "answer": "yes", "category": "existence",
                "small": all(objs[k].small for k in targets), "targets": targets}
    if kind == "no":
        present = {o.colour for o in objs}
        absent = [c for c in COLOUR_NAMES if c not in present]
        if not absent:
            pairs = {(o.colour, o.shape) for o in objs}
            colour, shape = rng.choice([(c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in pairs])
            return {"question": f"Is there a {colour} {shape} in the image?", "answer": "no",
                    "category": "existence", "small": False, "targets": []}
        # POPE-style adversarial negatives: a colour beside one in the scene on the hue wheel.
        n = len(HUE_WHEEL)
        adversarial = [c for c in absent if {HUE_WHEEL[(HUE_WHEEL.index(c) + d) % n] for d in (-1, 1)} & present]
        colour = rng.choice(adversarial if adversarial and rng.random() < 0.8 else absent)
        return {"question": f"Is there a {colour} object in the image?", "answer": "no", "category": "existence",
                "small": False, "targets": []}
    index = rng.randrange(len(objs))
    obj = objs[index]
    where = POSITIONS[obj.cell]
    if kind == "color":
        return {"question": f"What color is the object in the {where}?", "answer": obj.colour,
                "category": "color", "small": obj.small, "targets": [index]}
    if kind == "shape":
        return {"question": f"What shape is the object in the {where}?", "answer": obj.shape,
                "category": "shape", "small": obj.small, "targets": [index]}
    raise ValueError(f"unknown question kind {kind!r}; kinds: {KINDS}")


def scene_rng(split: str, index: int, seed: int = 0) -> random.Random:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return random.Random(f"visiondrop-shapes/{seed}/{split}/{index}")


def scene(split: str, index: int, seed: int = 0) -> Scene:
    return make_scene(scene_rng(split, index, seed))


def samples(split: str, n: int, seed: int = 0) -> list[dict]:
    """n (image, question, answer) samples, one per scene, question kinds cycling yes/no/color/shape."""
    rows = []
    for i in range(n):
        rng = scene_rng(split, i, seed)
        sc = make_scene(rng)
        q = make_question(sc, KINDS[i % len(KINDS)], rng)
        rows.append({"question_id": f"shapes-{split}-{i:04d}", "image": sc.image, **q})
    return rows
