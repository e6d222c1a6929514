"""Data of the `visiondrop_demo` task: coloured shapes on a plain background, one-word answers, made reproducibly.

Half the questions ask whether a coloured shape is there (yes and no balanced; a "no" names a shape that is
absent or a present shape in another colour), half ask for the colour of a shape (shapes in an image are of
distinct kinds, so the answer is unique). Rewrite the shipped file with

    python -m visiondrop.harness.tasks.visiondrop_demo.make_data
"""
from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (240, 210, 40), "purple": (140, 60, 180), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle")
SIZE = 336  # LLaVA-1.5's input resolution: no resizing before the vision tower
BACKGROUND = (235, 235, 235)
DATA_FILE = Path(__file__).parent / "demo.parquet"


def draw_scene(objects: list[tuple[str, str]], rng: random.Random) -> Image.Image:
    """Draw (shape, colour) objects, one per quadrant of the image, at random offsets and sizes."""
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    half = SIZE // 2
    for (shape, colour), quadrant in zip(objects, rng.sample(range(4), len(objects))):
        side = rng.randint(70, 120)
        x0 = (quadrant % 2) * half + rng.randint(10, half - side - 10)
        y0 = (quadrant // 2) * half + rng.randint(10, half - side - 10)
        box, fill = (x0, y0, x0 + side, y0 + side), COLOURS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x0 + side // 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    return image


def make_samples(n: int, seed: int = 0) -> list[dict]:
    """n samples cycling through: existence-yes, colour, existence-no, colour."""
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        shapes = rng.sample(SHAPES, rng.randint(1, len(SHAPES)))
        objects = list(zip(shapes, rng.sample(sorted(COLOURS), len(shapes))))
        kind = ("yes", "color", "no", "color")[i % 4]
        if kind == "yes":
            shape, colour = rng.choice(objects)
            question, answer = f"Is there a {colour} {shape} in the image?", "yes"
        elif kind == "no":
            absent = [(s, c) for s in SHAPES for c in sorted(COLOURS) if (s, c) not in objects]
            shape, colour = rng.choice(absent)
            question, answer = f"Is there a {colour} {shape} in the image?", "no"
        else:
            shape, colour = rng.choice(objects)
            question, answer = f"What color is the {shape}?", colour
        png = io.BytesIO()
        draw_scene(objects, rng).save(png, format="PNG")
        samples.append({"question_id": f"demo-{i:03d}", "image": {"bytes": png.getvalue(), "path": None},
                        "question": question, "answer": answer,
                        "category": "existence" if kind in ("yes", "no") else "color"})
    return samples


def make_demo_dataset(path: str | Path = DATA_FILE, n: int = 24, seed: int = 0) -> Path:
    """Write n samples to a parquet file that `datasets` reads back with decoded PIL images."""
    from datasets import Dataset, Features, Image as ImageFeature, Value

    features = Features({"question_id": Value("string"), "image": ImageFeature(), "question": Value("string"),
                         "answer": Value("string"), "category": Value("string")})
    rows = make_samples(n, seed)
    Dataset.from_dict({key: [row[key] for row in rows] for key in features}, features=features).to_parquet(str(path))
    return Path(path)


if __name__ == "__main__":
    print(make_demo_dataset())
