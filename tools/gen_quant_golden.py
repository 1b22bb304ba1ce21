#!/usr/bin/env python3
"""Golden files for ggml's block formats, made by the `gguf` Python package's independent numpy code.

For every type gguf-py can quantize (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16, BF16) it writes the input rows,
the quantized bytes and their dequantization; for the K-quants it can only dequantize (Q4_K, Q5_K, Q6_K)
it writes structured random blocks (finite scales, every bit pattern of the packed fields) and their
dequantization. `tests/quant_golden.rs` requires moellava's ggml wrappers to reproduce all of it bit for bit.

Usage: python tools/gen_quant_golden.py OUT_DIR      (the committed copy lives in tests/fixtures/quant/)
Deterministic: the same numpy/gguf versions write the same bytes (CI regenerates and compares).
"""
import json
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

ROWS, COLS = 8, 512
QUANTIZABLE = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16"]
DEQUANT_ONLY = ["Q4_K", "Q5_K", "Q6_K"]


def cases(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Input rows per edge-case class, all float32 [ROWS, COLS], NaN-free."""
    normal = rng.standard_normal((ROWS, COLS)).astype(np.float32) * np.logspace(-2, 1, ROWS, dtype=np.float32)[:, None]

    zeros = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    zeros[:4] = 0.0                      # whole rows of zeros
    zeros[4:, 32:64] = 0.0               # one all-zero block inside a nonzero row
    zeros[5:, 256:] = 0.0                # one all-zero super-block (K-quants)

    # Large magnitudes whose block scales and minimums still fit fp16 for every type (|x| <= 65504).
    huge = (rng.standard_normal((ROWS, COLS)) * 2.0e4).clip(-6.0e4, 6.0e4).astype(np.float32)
    huge[0] = 6.0e4 * np.sign(rng.standard_normal(COLS)).astype(np.float32)

    # Scales below fp16's normal range: subnormal d, and d that underflows to 0.
    tiny = (rng.standard_normal((ROWS, COLS)) * np.logspace(-9, -3, ROWS)[:, None]).astype(np.float32)

    edge = np.zeros((ROWS, COLS), dtype=np.float32)
    edge[0] = np.arange(COLS, dtype=np.float32) % 255 - 127          # amax 127: d = 1 exactly, integer values
    edge[1] = (np.arange(COLS) % 64 - 32).astype(np.float32) + 0.5  # exact .5 ties at d = 1 (round-half-away)
    edge[1, ::32] = 127.0
    edge[2] = 1.25                                                     # constant blocks: Q4_1 max == min
    edge[3] = rng.standard_normal(COLS).astype(np.float32) * 1e-3
    edge[3, ::32] = 50.0                                               # one outlier per block
    edge[4] = np.where(np.arange(COLS) % 2 == 0, 1.0, -1.0)            # alternating signs
    edge[5] = -np.abs(rng.standard_normal(COLS)).astype(np.float32)   # all negative: negative max for Q4_0
    edge[5, ::32] = -9.0
    edge[6] = np.float32(-0.0)                                         # negative zeros
    edge[7] = np.linspace(-1, 1, COLS, dtype=np.float32)
    return {"normal": normal, "zeros": zeros, "huge": huge, "tiny": tiny, "edge": edge}


def finite_f16(rng: np.random.Generator, n: int) -> np.ndarray:
    """Block scales: mostly normal fp16, some zero, some subnormal, some at the top of the range."""
    v = (rng.uniform(1e-4, 0.5, n) * rng.choice([-1.0, 1.0], n)).astype(np.float16)
    v[::7] = 0.0
    v[3::11] = np.float16(3e-6)    # subnormal
    v[5::13] = np.float16(6.0e4)
    return v


def k_blocks(qtype: str, rng: np.random.Generator, n_blocks: int) -> np.ndarray:
    """Random K-quant blocks with every packed field random and the fp16 scales finite."""
    bs, ts = quants.GGML_QUANT_SIZES[T[qtype]]
    blocks = rng.integers(0, 256, (n_blocks, ts), dtype=np.uint8)
    if qtype in ("Q4_K", "Q5_K"):      # layout: d, dmin, scales[12], (qh[32]), qs[128]
        blocks[:, 0:2] = finite_f16(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
        blocks[:, 2:4] = finite_f16(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    else:                              # Q6_K layout: ql[128], qh[64], scales[16], d
        blocks[:, ts - 2:] = finite_f16(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    blocks[0, :] = 0                   # an all-zero block
    return blocks


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20261123)
    manifest = {"rows": ROWS, "cols": COLS, "quantized": {}, "dequant_only": {}}
    for name, x in cases(rng).items():
        np.save(out / f"input_{name}.npy", x)
        for qname in QUANTIZABLE:
            q = quants.quantize(x, T[qname])
            raw = np.ascontiguousarray(q).view(np.uint8).reshape(ROWS, -1)
            deq = quants.dequantize(raw, T[qname]).astype(np.float32).reshape(ROWS, COLS)
            assert np.isfinite(deq).all(), (qname, name)
            np.save(out / f"{qname.lower()}_{name}.npy", raw)
            np.save(out / f"{qname.lower()}_{name}_dequant.npy", deq)
            manifest["quantized"].setdefault(qname.lower(), []).append(name)
    for qname in DEQUANT_ONLY:
        blocks = k_blocks(qname, rng, 48)
        deq = quants.dequantize(blocks.reshape(-1), T[qname]).astype(np.float32)
        assert np.isfinite(deq).all(), qname
        np.save(out / f"{qname.lower()}_blocks.npy", blocks.reshape(-1))
        np.save(out / f"{qname.lower()}_blocks_dequant.npy", deq)
        manifest["dequant_only"][qname.lower()] = 48
    from importlib.metadata import version
    manifest["generator"] = {"gguf": version("gguf"), "numpy": np.__version__}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
