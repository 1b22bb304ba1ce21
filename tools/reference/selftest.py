#!/usr/bin/env python3
"""Proof that the reference and its fixtures can catch mistakes.

1. The MoE routing of moe.py equals DeepSpeed 0.9.5's own `top2gating` (deepspeed/moe/sharded_moe.py,
   loaded by itself: DeepSpeed's package __init__ does not import under numpy 2) on random gate logits —
   with its Gumbel noise replaced by zeros (moellava's deterministic mode) and by a given noise tensor
   (the sampled mode) — including capacity factors that drop tokens.
2. Deliberate mistakes, each applied to the reference, move the last-position logits of a fixture case
   far beyond the F32 tolerance: no pad-to-square, a bilinear instead of bicubic resize, keeping SigLIP's
   first patch, no gate renormalisation, top-1 routing, tanh-GELU in the projector, full instead of
   partial rotary.

  .venv-reference/bin/python tools/reference/selftest.py [FIXTURES_DIR]     exit 0 when every check holds
"""
import copy
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import moe as moe_mod  # noqa: E402
import preprocess  # noqa: E402
from model import Reference  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# The F32 tolerance of tests/fixtures/README.md: max |Δlogit| / max |logit|.
F32_REL_TOL = 1e-5
# A mistake must move the logits by at least this many tolerances to count as caught.
CAUGHT_FACTOR = 100


def load_deepspeed_top2gating():
    path = None
    for p in sys.path:
        cand = Path(p) / "deepspeed/moe/sharded_moe.py"
        if cand.exists():
            path = cand
            break
    if path is None:
        return None
    stubs = {"deepspeed": types.ModuleType("deepspeed"), "deepspeed.utils": types.ModuleType("deepspeed.utils"),
             "deepspeed.utils.timer": types.ModuleType("deepspeed.utils.timer"), "deepspeed.moe": types.ModuleType("deepspeed.moe"),
             "deepspeed.moe.mappings": types.ModuleType("deepspeed.moe.mappings")}
    stubs["deepspeed.utils.timer"].SynchronizedWallClockTimer = object
    stubs["deepspeed.utils"].logger = None
    stubs["deepspeed.utils"].groups = None
    stubs["deepspeed.moe.mappings"].drop_tokens = stubs["deepspeed.moe.mappings"].gather_tokens = None
    stubs["deepspeed"].comm = types.ModuleType("deepspeed.comm")      # only used by multi-process paths
    stubs["deepspeed.moe"].__path__ = [str(path.parent)]
    sys.modules.update(stubs)
    spec = importlib.util.spec_from_file_location("deepspeed.moe.sharded_moe", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def check_against_deepspeed() -> list[str]:
    ds = load_deepspeed_top2gating()
    if ds is None:
        return ["SKIPPED: deepspeed is not installed (pip install deepspeed==0.9.5 in this venv)"]
    rng = np.random.default_rng(5)
    problems = []
    for trial in range(200):
        s, e = int(rng.integers(1, 300)), 4
        cf = float(rng.choice([2.0, 1.0, 0.5, 0.25]))
        min_cap = int(rng.choice([0, 0, 4]))
        d = 16
        x = torch.from_numpy(rng.standard_normal((s, d))).float()
        wg = torch.from_numpy(rng.standard_normal((e, d))).float()
        noise = None if trial % 2 == 0 else torch.from_numpy(-np.log(-np.log(rng.uniform(1e-9, 1, (s, e))))).float()
        ds.gumbel_rsample = lambda shape, device: torch.zeros(shape) if noise is None else noise.clone()
        logits = x @ wg.t()
        _, combine, _, _ = ds.top2gating(logits, cf, min_cap)
        want = combine.sum(dim=2)                                             # [S, E] weight of each expert per token
        _, idx, w, kept, _ = moe_mod.top2_routing(x, wg, cf, min_cap, noise)
        got = torch.zeros(s, e)
        for k in range(2):
            got[torch.arange(s), idx[:, k]] += torch.where(kept[:, k], w[:, k], torch.zeros(s))
        if not torch.allclose(got, want, atol=1e-6):
            problems.append(f"top2gating trial {trial} (S={s}, cf={cf}, min_capacity={min_cap}, noise={noise is not None}) differs")
    return problems or [f"ok: moe.py equals DeepSpeed {ds.__name__} top2gating on 200 random cases (with and without noise, with drops)"]


def last_logits(ref: Reference, case: dict, fixtures: Path, pixels_fn=None) -> torch.Tensor:
    pixels = None
    if case["image"]:
        pixels = torch.from_numpy((pixels_fn or preprocess.pixel_values)(fixtures / "images" / case["image"], ref.tower_dir, ref.tower_kind))
    ids = ref.tok.prompt_ids(case["prompt"])
    embeds = ref.embed(ids, None if pixels is None else ref.image_features(pixels)[1])
    return ref.generate(embeds, 1)[0][0]


def mistakes(fixtures: Path) -> list[str]:
    out = []
    ckpts = ROOT / "build/fixture-checkpoints"

    def judge(name: str, combo: str, case_name: str, got: torch.Tensor, what: str = "logits", factor: float = CAUGHT_FACTOR) -> None:
        arr = np.load(fixtures / "model" / combo / case_name / ("logits_f64.npy" if what == "logits" else f"{what}.npy"))
        ref = torch.from_numpy(arr[0] if what == "logits" else arr).double()
        if got.shape != ref.shape:
            out.append(f"caught: {name} ({combo}/{case_name}): {what} of another shape {tuple(got.shape)} vs {tuple(ref.shape)}")
            return
        rel = float((got.double() - ref).abs().max() / ref.abs().max())
        verdict = "caught" if rel > factor * F32_REL_TOL else "NOT CAUGHT"
        out.append(f"{verdict}: {name} ({combo}/{case_name}): max relative change of {what} {rel:.2e} (tolerance {F32_REL_TOL:.0e})")

    def case(combo, name):
        return json.loads((fixtures / "model" / combo / name / "case.json").read_text())

    torch.set_num_threads(1)
    phi = Reference(ckpts / "phi2-clip", torch.float64)
    c = case("phi2-clip", "pope_wide")
    no_pad = lambda p, t, k: preprocess_without_pad(p, t)
    judge("no pad-to-square", "phi2-clip", "pope_wide", last_logits(phi, c, fixtures, no_pad))
    bilinear = lambda p, t, k: preprocess_with_resample(p, t, k, 2)
    judge("bilinear resize", "phi2-clip", "pope_wide", last_logits(phi, c, fixtures, bilinear))
    proj = copy.deepcopy(phi.projector)
    phi.projector[1] = torch.nn.GELU(approximate="tanh")
    # tanh-GELU differs from erf-GELU by at most 5e-4, so it is judged where it acts: the image
    # embeddings, which the runtime must match to the same 1e-5 relative tolerance.
    pixels = torch.from_numpy(preprocess.pixel_values(fixtures / "images" / c["image"], phi.tower_dir, phi.tower_kind))
    judge("tanh-GELU in the projector", "phi2-clip", "pope_wide", phi.image_features(pixels)[1], "image_embeds", factor=5)
    phi.projector = proj
    orig = moe_mod.top2_routing

    def no_renorm(x, wg, cf, mc, noise=None):
        logits, idx, w, kept, cap = orig(x, wg, cf, mc, noise)
        gates = torch.softmax(logits, dim=1)
        return logits, idx, gates.gather(1, idx) * kept, kept, cap

    def top1(x, wg, cf, mc, noise=None):
        logits, idx, w, kept, cap = orig(x, wg, cf, mc, noise)
        return logits, idx, torch.stack([torch.ones_like(w[:, 0]), torch.zeros_like(w[:, 1])], dim=1), kept, cap

    for name, fn in (("no gate renormalisation", no_renorm), ("top-1 routing", top1)):
        moe_mod.top2_routing = fn
        sys.modules["moe"].top2_routing = fn
        judge(name, "phi2-clip", "pope_wide", last_logits(phi, c, fixtures))
        moe_mod.top2_routing = orig
    full_rot = Reference(ckpts / "phi2-clip", torch.float64, overrides={"partial_rotary_factor": 1.0})
    judge("full instead of partial rotary", "phi2-clip", "pope_wide", last_logits(full_rot, c, fixtures))
    sig = Reference(ckpts / "phi2-siglip", torch.float64, overrides={"mm_vision_select_feature": "cls_patch"})
    judge("keeping SigLIP's first patch", "phi2-siglip", "pope_wide", last_logits(sig, case("phi2-siglip", "pope_wide"), fixtures))
    return out


def preprocess_without_pad(path: Path, tower_dir: Path) -> np.ndarray:
    from PIL import Image
    from transformers import CLIPImageProcessor
    return CLIPImageProcessor.from_pretrained(str(tower_dir)).preprocess(Image.open(path).convert("RGB"), return_tensors="np")["pixel_values"][0]


def preprocess_with_resample(path: Path, tower_dir: Path, kind: str, resample: int) -> np.ndarray:
    from PIL import Image
    from transformers import CLIPImageProcessor
    pre = json.loads((tower_dir / "preprocessor_config.json").read_text())
    img = preprocess.expand2square(Image.open(path).convert("RGB"), tuple(int(x * 255) for x in pre["image_mean"]))
    proc = CLIPImageProcessor.from_pretrained(str(tower_dir), resample=resample)
    return proc.preprocess(img, return_tensors="np")["pixel_values"][0]


def main() -> int:
    fixtures = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests/fixtures"
    lines = check_against_deepspeed() + mistakes(fixtures)
    for line in lines:
        print(line)
    return 1 if any(line.startswith(("NOT CAUGHT", "top2gating")) for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
