#!/usr/bin/env python3
"""GGUF interoperability with the `gguf` Python package (llama.cpp's gguf-py), both directions.

  gguf_interop.py write OUT.gguf OUT.json   gguf-py's GGUFWriter writes a file with every value type,
                                            arrays and tensors of several ggml types; OUT.json says what
                                            it holds, for moellava's reader to compare against.
  gguf_interop.py read FILE.gguf EXPECT.json  gguf-py's GGUFReader reads a file (written by moellava)
                                            and every key, value, tensor type, shape and byte must equal
                                            EXPECT.json. Exit 0 when all equal, 1 with the differences.

EXPECT.json: {"kv": {key: {"type": "u32" | "array[string]" | ..., "value": ...}},
              "tensors": [{"name", "type" (lowercase ggml name), "ne" (ggml order), "sha256"}]}
"""
import hashlib
import json
import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

TYPE_NAMES = {
    GGUFValueType.UINT8: "u8", GGUFValueType.INT8: "i8", GGUFValueType.UINT16: "u16", GGUFValueType.INT16: "i16",
    GGUFValueType.UINT32: "u32", GGUFValueType.INT32: "i32", GGUFValueType.FLOAT32: "f32", GGUFValueType.BOOL: "bool",
    GGUFValueType.STRING: "string", GGUFValueType.UINT64: "u64", GGUFValueType.INT64: "i64", GGUFValueType.FLOAT64: "f64",
}


def write(path: str, expect_path: str) -> None:
    rng = np.random.default_rng(7)
    w = GGUFWriter(path, arch="interop")
    kv = {"general.architecture": {"type": "string", "value": "interop"}}

    def add(key, value, vtype, sub=None):
        w.add_key_value(key, value, vtype, sub_type=sub)
        tname = f"array[{TYPE_NAMES[sub]}]" if vtype == GGUFValueType.ARRAY else TYPE_NAMES[vtype]
        kv[key] = {"type": tname, "value": value}

    add("t.u8", 200, GGUFValueType.UINT8)
    add("t.i8", -100, GGUFValueType.INT8)
    add("t.u16", 60000, GGUFValueType.UINT16)
    add("t.i16", -30000, GGUFValueType.INT16)
    add("t.u32", 4000000000, GGUFValueType.UINT32)
    add("t.i32", -2000000000, GGUFValueType.INT32)
    add("t.f32", 0.1, GGUFValueType.FLOAT32)
    add("t.bool", True, GGUFValueType.BOOL)
    add("t.string", "héllo wörld ✓", GGUFValueType.STRING)
    add("t.u64", 2**63 + 5, GGUFValueType.UINT64)
    add("t.i64", -(2**62), GGUFValueType.INT64)
    add("t.f64", 1.0 / 3.0, GGUFValueType.FLOAT64)
    add("t.arr_str", ["a", "", "Ġthe", "<|endoftext|>", "日本"], GGUFValueType.ARRAY, GGUFValueType.STRING)
    add("t.arr_i32", [1, -2, 3, 2**31 - 1], GGUFValueType.ARRAY, GGUFValueType.INT32)
    add("t.arr_f32", [0.5, -1.25, 3.0], GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
    add("t.arr_bool", [True, False, True], GGUFValueType.ARRAY, GGUFValueType.BOOL)
    add("t.arr_u8", list(range(20)), GGUFValueType.ARRAY, GGUFValueType.UINT8)

    tensors = []
    f32 = rng.standard_normal((3, 8)).astype(np.float32)
    f16 = rng.standard_normal((2, 2, 16)).astype(np.float16)
    q8 = rng.integers(0, 256, (4, 34 * 2), dtype=np.uint8)        # 4 rows of 64 values
    q8[:, 0:2] = np.array([0.01], dtype=np.float16).view(np.uint8)    # finite scale in the first block
    q4k = rng.integers(0, 256, (2, 144), dtype=np.uint8)             # 2 rows of 256 values
    w.add_tensor("f32_tensor", f32)
    tensors.append(("f32_tensor", "f32", [8, 3], f32.tobytes()))
    w.add_tensor("f16_tensor", f16)
    tensors.append(("f16_tensor", "f16", [16, 2, 2], f16.tobytes()))
    w.add_tensor("q8_tensor", q8, raw_dtype=GGMLQuantizationType.Q8_0)
    tensors.append(("q8_tensor", "q8_0", [64, 4], q8.tobytes()))
    w.add_tensor("blk.0.ffn_up_exps.weight", q4k, raw_dtype=GGMLQuantizationType.Q4_K)
    tensors.append(("blk.0.ffn_up_exps.weight", "q4_k", [256, 2], q4k.tobytes()))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    expect = {"kv": kv, "tensors": [{"name": n, "type": t, "ne": ne, "sha256": hashlib.sha256(b).hexdigest()} for n, t, ne, b in tensors]}
    with open(expect_path, "w") as f:
        json.dump(expect, f, indent=1)


def same_value(tname: str, want, got) -> bool:
    if tname in ("f32", "array[f32]"):
        return np.array_equal(np.float32(want), np.float32(got))
    return want == got


def read(path: str, expect_path: str) -> int:
    with open(expect_path) as f:
        expect = json.load(f)
    r = GGUFReader(path)
    problems = []
    fields = {k: v for k, v in r.fields.items() if not k.startswith("GGUF.")}
    for key, want in expect["kv"].items():
        field = fields.get(key)
        if field is None:
            problems.append(f"key {key!r} missing")
            continue
        types = [TYPE_NAMES.get(t, "array") for t in field.types]
        tname = f"array[{types[-1]}]" if field.types[0] == GGUFValueType.ARRAY else types[0]
        got = field.contents()
        if isinstance(got, np.generic):
            got = got.item()
        if tname != want["type"]:
            problems.append(f"key {key!r}: type {tname}, expected {want['type']}")
        elif not same_value(tname, want["value"], got):
            problems.append(f"key {key!r}: value {got!r}, expected {want['value']!r}")
    extra = set(fields) - set(expect["kv"])
    if extra:
        problems.append(f"unexpected keys {sorted(extra)}")
    got_tensors = {t.name: t for t in r.tensors}
    if [t.name for t in r.tensors] != [t["name"] for t in expect["tensors"]]:
        problems.append(f"tensor order {[t.name for t in r.tensors]}, expected {[t['name'] for t in expect['tensors']]}")
    for want in expect["tensors"]:
        t = got_tensors.get(want["name"])
        if t is None:
            problems.append(f"tensor {want['name']!r} missing")
            continue
        if t.tensor_type.name.lower() != want["type"]:
            problems.append(f"tensor {t.name!r}: type {t.tensor_type.name.lower()}, expected {want['type']}")
        if [int(x) for x in t.shape] != want["ne"]:
            problems.append(f"tensor {t.name!r}: ne {list(t.shape)}, expected {want['ne']}")
        digest = hashlib.sha256(np.ascontiguousarray(t.data).view(np.uint8).tobytes()).hexdigest()
        if digest != want["sha256"]:
            problems.append(f"tensor {t.name!r}: bytes differ (sha256 {digest})")
    for p in problems:
        print(p)
    print("OK" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("write", "read"):
        sys.exit(__doc__)
    if sys.argv[1] == "write":
        write(sys.argv[2], sys.argv[3])
    else:
        sys.exit(read(sys.argv[2], sys.argv[3]))
