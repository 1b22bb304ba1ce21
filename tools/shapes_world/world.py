#!/usr/bin/env python3
"""A synthetic picture world for training and evaluating a small MoE-LLaVA (issue: POPE).

Objects: 20 classes = 5 shapes × 4 colours ("red circle", "blue star", …), drawn anti-aliased at
random sizes and positions (they may overlap, so some are partly hidden) on plain, gradient or noisy
backgrounds. Pictures follow one of four scene types whose class frequencies differ, so objects
co-occur with structure — which is what POPE's "popular" and "adversarial" splits exploit.

  world.py pope  OUT_DIR [--images N] [--seed S]    held-out test pictures + POPE files, official formats:
      OUT_DIR/images/shapes_test_%012d.png
      OUT_DIR/coco/coco_pope_{random,popular,adversarial}.json   {"question_id","image","image_id","text","label"}
      OUT_DIR/llava_pope_test.jsonl    {"question_id","image","text": "…?\\nAnswer the question using a single
                                        word or phrase.","category"}
      OUT_DIR/annotations.json         COCO-like: images, categories, annotations (bbox, category_id)
Training pictures come from `picture(seed, …)` directly (tools/train_toy/train.py), with seeds disjoint
from the test split's.

POPE sampling (Li et al. 2023, AoiDragon/POPE): per picture, 3 present objects (questions answered
"yes") and 3 absent ones ("no"): random = uniform among absent classes; popular = the most frequent
classes of the dataset that are absent; adversarial = the absent classes that co-occur most often with
the present ones. Deterministic for a seed (Pillow 13, numpy 2.4).
"""
import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ["circle", "square", "triangle", "star", "heart"]
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
CLASSES = [f"{c} {s}" for c in COLOURS for s in SHAPES]
SIDE = 64            # pictures are generated square at the tower's input size
SCALE = 4            # drawn at 4× and downsampled: anti-aliased edges
POPE_INSTRUCTION = "\nAnswer the question using a single word or phrase."

# Scene types: relative weight of each colour and shape (class weight = colour weight × shape weight).
SCENES = {
    "warm": ({"red": 4, "yellow": 4, "green": 1, "blue": 0.5}, {s: 1 for s in SHAPES}),
    "cool": ({"red": 0.5, "yellow": 1, "green": 4, "blue": 4}, {s: 1 for s in SHAPES}),
    "round": ({c: 1 for c in COLOURS}, {"circle": 5, "heart": 4, "square": 1, "triangle": 0.5, "star": 0.5}),
    "sharp": ({c: 1 for c in COLOURS}, {"circle": 0.5, "heart": 0.5, "square": 3, "triangle": 4, "star": 4}),
}


def class_weights(scene: str) -> np.ndarray:
    cw, sw = SCENES[scene]
    return np.array([cw[c] * sw[s] for c in COLOURS for s in SHAPES], dtype=np.float64)


def shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return [(cx + (r if i % 2 == 0 else r * 0.45) * math.cos(-math.pi / 2 + i * math.pi / 5),
                 cy + (r if i % 2 == 0 else r * 0.45) * math.sin(-math.pi / 2 + i * math.pi / 5)) for i in range(10)]
    if shape == "heart":
        pts = []
        for i in range(40):
            t = 2 * math.pi * i / 40
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((cx + x * r / 17, cy + y * r / 17))
        return pts
    return None


def background(rng: np.random.Generator) -> Image.Image:
    kind = rng.integers(0, 3)
    base = rng.integers(150, 250, size=3)
    if kind == 0:
        return Image.new("RGB", (SIDE * SCALE, SIDE * SCALE), tuple(int(v) for v in base))
    if kind == 1:
        other = rng.integers(120, 250, size=3)
        t = np.linspace(0, 1, SIDE * SCALE)[None, :, None] if rng.integers(0, 2) else np.linspace(0, 1, SIDE * SCALE)[:, None, None]
        arr = base[None, None, :] * (1 - t) + other[None, None, :] * t
        arr = np.broadcast_to(arr, (SIDE * SCALE, SIDE * SCALE, 3))
        return Image.fromarray(arr.astype(np.uint8), "RGB")
    noise = rng.normal(0, 12, size=(SIDE, SIDE, 3))
    arr = np.clip(base[None, None, :] + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB").resize((SIDE * SCALE, SIDE * SCALE), Image.NEAREST)


def render(objects: list[dict], rng: np.random.Generator) -> Image.Image:
    img = background(rng)
    draw = ImageDraw.Draw(img)
    for o in objects:
        colour, shape = o["name"].split()
        fill = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in COLOURS[colour])
        cx, cy, r = (v * SCALE for v in o["center_radius"])
        pts = shape_points(shape, cx, cy, r)
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "square":
            draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
        else:
            draw.polygon(pts, fill=fill)
    return img.resize((SIDE, SIDE), Image.LANCZOS)


def scene_objects(rng: np.random.Generator, n_min: int, n_max: int) -> tuple[str, list[dict]]:
    scene = list(SCENES)[rng.integers(0, len(SCENES))]
    w = class_weights(scene)
    n = int(rng.integers(n_min, n_max + 1))
    names = rng.choice(len(CLASSES), size=n, replace=False, p=w / w.sum())
    objects = []
    for k in names:
        r = float(rng.uniform(7, 12))
        # Objects may overlap a little (partial occlusion) but never hide each other: centres stay at
        # least 0.75·(r1 + r2) apart; a few tries, then the closest-to-valid spot.
        best = None
        for _ in range(30):
            cx, cy = float(rng.uniform(r, SIDE - r)), float(rng.uniform(r, SIDE - r))
            gap = min((math.hypot(cx - o["center_radius"][0], cy - o["center_radius"][1]) - 0.75 * (r + o["center_radius"][2]) for o in objects), default=1.0)
            if best is None or gap > best[0]:
                best = (gap, cx, cy)
            if gap >= 0:
                break
        _, cx, cy = best
        objects.append({"name": CLASSES[k], "center_radius": [cx, cy, r], "bbox": [cx - r, cy - r, 2 * r, 2 * r]})
    return scene, objects


def picture(seed: int, n_min: int, n_max: int) -> tuple[Image.Image, str, list[dict]]:
    rng = np.random.default_rng(seed)
    scene, objects = scene_objects(rng, n_min, n_max)
    return render(objects, rng), scene, objects


def caption(objects: list[dict]) -> str:
    names = [f"a {o['name']}" for o in objects]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return listed[0].upper() + listed[1:] + "."


def frequencies(all_objects: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    freq = np.zeros(len(CLASSES))
    co = np.zeros((len(CLASSES), len(CLASSES)))
    for names in all_objects:
        ids = [CLASSES.index(n) for n in names]
        for i in ids:
            freq[i] += 1
            for j in ids:
                if i != j:
                    co[i, j] += 1
    return freq, co


def pope_negatives(present: list[str], kind: str, freq, co, rng: np.random.Generator, n: int = 3) -> list[str]:
    absent = [c for c in CLASSES if c not in present]
    if kind == "random":
        return [absent[i] for i in rng.choice(len(absent), size=n, replace=False)]
    if kind == "popular":
        return sorted(absent, key=lambda c: (-freq[CLASSES.index(c)], c))[:n]
    score = {c: sum(co[CLASSES.index(p), CLASSES.index(c)] for p in present) for c in absent}
    return sorted(absent, key=lambda c: (-score[c], c))[:n]


def make_pope(out: Path, n_images: int, seed: int) -> None:
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "coco").mkdir(parents=True, exist_ok=True)
    pics = []
    for i in range(n_images):
        img, scene, objects = picture(seed * 1_000_003 + i, 3, 4)
        name = f"shapes_test_{i:012d}.png"
        img.save(out / "images" / name)
        pics.append((i, name, scene, objects))
    # POPE draws "popular" and co-occurrence statistics from the dataset's own annotations.
    freq, co = frequencies([[o["name"] for o in objs] for _, _, _, objs in pics])
    rng = np.random.default_rng(seed + 7)
    questions, qid = [], 0
    for kind in ("adversarial", "popular", "random"):
        lines = []
        for image_id, name, _, objects in pics:
            present = sorted({o["name"] for o in objects}, key=CLASSES.index)
            pos = [present[i] for i in rng.choice(len(present), size=3, replace=False)]
            neg = pope_negatives(present, kind, freq, co, rng)
            for obj, label in [(p, "yes") for p in pos] + [(n, "no") for n in neg]:
                text = f"Is there a {obj} in the image?"
                lines.append({"question_id": qid, "image": name, "image_id": image_id, "text": text, "label": label})
                questions.append({"question_id": qid, "image": name, "text": text + POPE_INSTRUCTION, "category": kind})
                qid += 1
        (out / "coco" / f"coco_pope_{kind}.json").write_text("".join(json.dumps(l) + "\n" for l in lines))
    (out / "llava_pope_test.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    coco = {"images": [{"id": i, "file_name": n, "width": SIDE, "height": SIDE, "scene": s} for i, n, s, _ in pics],
            "categories": [{"id": k, "name": c} for k, c in enumerate(CLASSES)],
            "annotations": [{"id": 100 * i + j, "image_id": i, "category_id": CLASSES.index(o["name"]), "bbox": o["bbox"]}
                            for i, _, _, objs in pics for j, o in enumerate(objs)]}
    (out / "annotations.json").write_text(json.dumps(coco, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pope")
    p.add_argument("out", type=Path)
    p.add_argument("--images", type=int, default=60)
    p.add_argument("--seed", type=int, default=424242)
    args = ap.parse_args()
    if args.cmd == "pope":
        make_pope(args.out, args.images, args.seed)


if __name__ == "__main__":
    main()
