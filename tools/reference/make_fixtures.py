#!/usr/bin/env python3
"""Golden fixtures for the runtime: the reference model (model.py) run on generated checkpoints.

  make fixtures      (= .venv-reference/bin/python tools/reference/make_fixtures.py tests/fixtures)

For 8 checkpoints — the 6 family × tower MoE combinations, a dense stage-2 checkpoint, and a MoE
checkpoint whose eval_capacity_factor 0.5 makes the gate drop tokens — and 4 cases each (POPE question +
wide image, POPE question + tall image, free-form question + square image, text only), it writes
tests/fixtures/model/<combo>/<case>/:

  checkpoint.json           (per combo) the generator command and the SHA-256 of every checkpoint file
  case.json                 prompt, input ids (-200 = image), token counts, greedy tokens per compute
                            precision, routing per MoE layer (experts, weights, kept, top-2 margins,
                            capacity) and, for MoE cases with an image, the sampled-second-expert run
  pixel_values.npy          [3, S, S] preprocessed image
  vision_features.npy       [N, W] tower output at the select layer (after [:, 1:])
  image_embeds.npy          [N, H] projector output
  layer_{i}.npy             [T, H] output of decoder layer i over the whole prompt (prefill)
  router_logits_{l}.npy     [T, E] gate logits of MoE layer l (prefill)
  logits_{f64,f32,f16}.npy  [8, V] logits of 8 greedy steps (row 0 = last prompt position), computed in
                            float64, float32 and float16; V = len(tokenizer)
  noise_{l}.npy, sampled_logits.npy   Gumbel noise given to the sampled mode, and its last logits

Intermediates come from the float64 run (the truth the runtime's f32 path is held to); all arrays are
stored as float32.
Deterministic: single-threaded torch; a second run writes the same bytes.
"""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).parent))
from model import Reference  # noqa: E402
from preprocess import IMAGE_TOKEN_INDEX, build_prompt, pixel_values  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
POPE = "\nAnswer the question using a single word or phrase."
CASES = [
    ("pope_wide", "Is there a chair in the image?" + POPE, "wide.png"),
    ("pope_tall", "Is there a dog in the image?" + POPE, "tall.png"),
    ("free_square", "What is in the picture? Describe it.", "square.png"),
    ("text_only", "What is the capital of France?", None),
]
COMBOS = [
    ("phi2-clip", ["--backbone", "phi2", "--tower", "clip"]),
    ("phi2-siglip", ["--backbone", "phi2", "--tower", "siglip"]),
    ("stablelm-clip", ["--backbone", "stablelm", "--tower", "clip"]),
    ("stablelm-siglip", ["--backbone", "stablelm", "--tower", "siglip"]),
    ("qwen-clip", ["--backbone", "qwen", "--tower", "clip"]),
    ("qwen-siglip", ["--backbone", "qwen", "--tower", "siglip"]),
    ("phi2-clip-dense", ["--backbone", "phi2", "--tower", "clip", "--dense"]),
    ("qwen-clip-drop", ["--backbone", "qwen", "--tower", "clip", "--eval-capacity-factor", "0.5"]),
]
N_STEPS = 8
PRECISIONS = {"f64": torch.float64, "f32": torch.float32, "f16": torch.float16}


def make_images(d: Path) -> None:
    """Three bundled pictures of coloured shapes (odd sizes: the pad offsets and resampling matter)."""
    d.mkdir(parents=True, exist_ok=True)
    specs = {"wide.png": (123, 77, (240, 240, 230)), "tall.png": (48, 66, (30, 60, 90)), "square.png": (90, 90, (200, 220, 255))}
    for name, (w, h, bg) in specs.items():
        img = Image.new("RGB", (w, h), bg)
        dr = ImageDraw.Draw(img)
        dr.ellipse([w * 0.1, h * 0.2, w * 0.45, h * 0.7], fill=(220, 30, 30))
        dr.rectangle([w * 0.5, h * 0.15, w * 0.9, h * 0.55], fill=(30, 90, 220))
        dr.polygon([(w * 0.2, h * 0.95), (w * 0.5, h * 0.6), (w * 0.8, h * 0.95)], fill=(40, 180, 60))
        for i in range(0, w, 7):      # fine detail, so downscaling filters differ measurably
            dr.line([(i, 0), (i, h // 10)], fill=(0, 0, 0) if i % 2 else (255, 255, 0))
        img.save(d / name, optimize=False)


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def checkpoint(tmp: Path, combo: str, args: list[str]) -> tuple[Path, dict]:
    out = tmp / combo
    if not (out / "model" / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "tools/gen_checkpoint.py"), *args, "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    files = {str(p.relative_to(out)): sha256(p) for p in sorted(out.rglob("*")) if p.is_file()}
    return out, {"command": "python tools/gen_checkpoint.py " + " ".join(args) + " --out DIR", "args": args, "sha256": files}


def routing_record(trace: dict) -> dict:
    logits = trace["logits"].double()
    top = torch.sort(logits, dim=1, descending=True).values
    margin = torch.minimum(top[:, 0] - top[:, 1], top[:, 1] - top[:, 2])
    return {"experts": trace["idx"].tolist(), "weights": trace["weights"].double().tolist(), "kept": trace["kept"].tolist(),
            "margin": margin.tolist(), "capacity": int(trace["capacity"])}


def save(d: Path, name: str, t: torch.Tensor) -> None:
    np.save(d / f"{name}.npy", np.ascontiguousarray(t.detach().to(torch.float32).numpy()))


def run_case(models: dict, d: Path, question: str, image: str | None, images: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    ref64 = models["f64"]
    prompt = build_prompt(question, image is not None)
    ids = ref64.tok.prompt_ids(prompt)
    case = {"prompt": prompt, "question": question, "image": image, "input_ids": ids,
            "len_tokenizer": ref64.tok.len, "eos": ref64.tok.eos}
    pixels = None
    if image:
        pixels = torch.from_numpy(pixel_values(images / image, ref64.tower_dir, ref64.tower_kind))
        save(d, "pixel_values", pixels)
    greedy = {}
    for prec, ref in models.items():
        embeds_img = None
        if pixels is not None:
            feats, embeds_img = ref.image_features(pixels)
            if prec == "f64":
                save(d, "vision_features", feats)
                save(d, "image_embeds", embeds_img)
        embeds = ref.embed(ids, embeds_img)
        logits, tokens, layers, routing = ref.generate(embeds, N_STEPS)
        save(d, f"logits_{prec}", logits)
        greedy[prec] = tokens
        if prec == "f64":
            case["n_tokens"] = int(embeds.shape[1])
            case["n_image_tokens"] = 0 if embeds_img is None else int(embeds_img.shape[0])
            for i, h in enumerate(layers):
                save(d, f"layer_{i}", h)
            case["routing"] = {}
            for layer, trace in routing.items():
                save(d, f"router_logits_{layer}", trace["logits"])
                case["routing"][str(layer)] = routing_record(trace)
    case["greedy"] = greedy
    if ref64.moe_modules and image:
        # The reference's sampled second expert, with Gumbel noise fixed here so the runtime can be fed the same.
        key = "/".join(d.parts[-2:])    # combo/case: independent of where the fixtures are written
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))
        noise = {}
        for layer in ref64.moe_modules:
            u = rng.uniform(1e-9, 1.0, size=(case["n_tokens"], len(ref64.moe_modules[layer].experts)))
            noise[layer] = torch.from_numpy(-np.log(-np.log(u)))    # Gumbel(0, 1)
            np.save(d / f"noise_{layer}.npy", noise[layer].numpy().astype(np.float32))
        embeds = ref64.embed(ids, ref64.image_features(pixels)[1])
        noise = {k: v.to(torch.float32).to(torch.float64) for k, v in noise.items()}   # the runtime sees the f32 copy
        logits, tokens, _, routing = ref64.generate(embeds, 1, noise=noise)
        save(d, "sampled_logits", logits[0])
        case["sampled"] = {"routing": {str(k): routing_record(v) for k, v in routing.items()}}
    (d / "case.json").write_text(json.dumps(case, indent=1) + "\n")


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests/fixtures"
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    images = out / "images"
    make_images(images)
    tmp = ROOT / "build/fixture-checkpoints"
    for combo, args in COMBOS:
        root, record = checkpoint(tmp, combo, args)
        models = {p: Reference(root, dt) for p, dt in PRECISIONS.items()}
        (out / "model" / combo).mkdir(parents=True, exist_ok=True)
        (out / "model" / combo / "checkpoint.json").write_text(json.dumps(record, indent=1) + "\n")
        for case, question, image in CASES:
            run_case(models, out / "model" / combo / case, question, image, images)
        print(f"{combo}: {len(CASES)} cases", flush=True)


if __name__ == "__main__":
    main()
