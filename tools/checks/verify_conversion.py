#!/usr/bin/env python3
"""A converted GGUF, read by the `gguf` Python package, holds the source checkpoint's tensors.

  verify_conversion.py MANIFEST.json

MANIFEST: {"files": [{"gguf": path, "tensors": [{"name", "type", "shape" (row-major), "rows" (or null),
           "sources": [{"file": safetensors path, "name"}]}]}]}
For every tensor: GGUFReader finds it with that type and shape; gguf-py dequantizes it; the sources are
read straight from the safetensors files (BF16/F16/F32, decoded here), concatenated along the outermost
dimension and cut to `rows`; the two agree within the type's error (constants below). Exit 0 if all do.
"""
import json
import struct
import sys

import numpy as np
from gguf import GGUFReader
from gguf import quants

# f32 stores the source exactly.
# f16/bf16 round once: relative error at most half an ulp (2^-11 / 2^-8), absolute at most half the
# smallest subnormal step for values below the normal range.
F16_REL, F16_ABS = 2.0 ** -11, 2.0 ** -25
BF16_REL, BF16_ABS = 2.0 ** -8, 2.0 ** -133
# Block quantization: NMSE = Σ(a-b)²/Σa² on Gaussian-like weights is about step²/12/σ² with a block's
# range of ≈ 6σ (32 values) or ≈ 5σ per 32-value sub-block (K-quants); bounds with 2× headroom.
MAX_NMSE = {"q8_0": 2e-4, "q6_k": 2e-3, "q5_0": 7e-3, "q5_1": 7e-3, "q5_k": 7e-3, "q4_0": 3e-2, "q4_1": 3e-2, "q4_k": 3e-2}


def read_safetensors(path: str, cache: dict) -> tuple[dict, memoryview]:
    if path not in cache:
        with open(path, "rb") as f:
            raw = f.read()
        n = struct.unpack("<Q", raw[:8])[0]
        cache[path] = (json.loads(raw[8:8 + n]), memoryview(raw)[8 + n:])
    return cache[path]


def source_array(src: dict, cache: dict) -> np.ndarray:
    header, data = read_safetensors(src["file"], cache)
    info = header[src["name"]]
    b, e = info["data_offsets"]
    buf = np.frombuffer(data[b:e], dtype=np.uint8)
    if info["dtype"] == "BF16":
        a = (buf.view("<u2").astype(np.uint32) << 16).view(np.float32)
    elif info["dtype"] == "F16":
        a = buf.view("<f2").astype(np.float32)
    elif info["dtype"] == "F32":
        a = buf.view("<f4")
    else:
        raise SystemExit(f"{src['file']}: {src['name']} has dtype {info['dtype']}")
    return a.reshape(info["shape"])


def check_tensor(t: dict, gt, cache: dict) -> str | None:
    if gt is None:
        return f"{t['name']}: missing from the GGUF"
    got_type = gt.tensor_type.name.lower()
    if got_type != t["type"]:
        return f"{t['name']}: type {got_type}, expected {t['type']}"
    shape = [int(x) for x in reversed(gt.shape)]
    if shape != t["shape"]:
        return f"{t['name']}: shape {shape}, expected {t['shape']}"
    got = quants.dequantize(np.asarray(gt.data), gt.tensor_type).astype(np.float64).reshape(-1)
    if not t["sources"]:
        return None if not got.any() else f"{t['name']}: expected zeros"
    parts = [source_array(s, cache) for s in t["sources"]]
    if t["rows"] is not None:
        parts = [p[: t["rows"]] for p in parts]
    want = np.concatenate([p.reshape(-1) for p in parts]).astype(np.float64)
    if want.size != got.size:
        return f"{t['name']}: {got.size} values, sources hold {want.size}"
    err = np.abs(got - want)
    if t["type"] == "f32":
        ok, what = np.array_equal(got, want), "not bit-exact"
    elif t["type"] in ("f16", "bf16"):
        rel, tiny = (F16_REL, F16_ABS) if t["type"] == "f16" else (BF16_REL, BF16_ABS)
        bound = np.maximum(rel * np.abs(want), tiny)
        ok, what = bool((err <= bound).all()), f"max error {err.max():.3g} above one rounding"
    else:
        nmse = float((err ** 2).sum() / max((want ** 2).sum(), 1e-300))
        ok, what = nmse <= MAX_NMSE[t["type"]], f"NMSE {nmse:.3g} > {MAX_NMSE[t['type']]}"
    return None if ok else f"{t['name']} ({t['type']}): {what}"


def main() -> int:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    manifest = json.load(open(sys.argv[1]))
    problems, checked = [], 0
    cache: dict = {}
    for f in manifest["files"]:
        r = GGUFReader(f["gguf"])
        by_name = {t.name: t for t in r.tensors}
        if len(by_name) != len(f["tensors"]):
            problems.append(f"{f['gguf']}: {len(by_name)} tensors, expected {len(f['tensors'])}")
        for t in f["tensors"]:
            p = check_tensor(t, by_name.get(t["name"]), cache)
            checked += 1
            if p:
                problems.append(f"{f['gguf']}: {p}")
    for p in problems[:20]:
        print(p)
    print(f"{checked - len(problems)}/{checked} tensors match their sources")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
