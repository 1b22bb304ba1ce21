"""Rewrites a dense language-model GGUF from `moellava convert --split` the way llama.cpp's own
converter (convert_hf_to_gguf.py) lays out the same model, for tests/llama_files.rs:

- Phi-2 and StableLM: the fused `attn_qkv` becomes `attn_q`, `attn_k`, `attn_v` (weights and biases),
  as llama.cpp writes them from the Hugging Face q_proj / k_proj / v_proj (Qwen keeps `c_attn` fused);
- every `moellava.*` key is dropped: a llama.cpp file has none of them.

Usage: llama_layout.py IN.gguf OUT.gguf   (IN holds f32 or f16 tensors; rows are split, never re-rounded)
"""

import sys

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

SPLIT_FAMILIES = ("phi2", "stablelm")


def main(src: str, dst: str) -> None:
    r = GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    key = lambda s: f"{arch}.{s}"  # noqa: E731
    d = int(r.fields[key("embedding_length")].contents())
    n_head = int(r.fields[key("attention.head_count")].contents())
    kv_field = r.fields.get(key("attention.head_count_kv"))
    n_kv = int(kv_field.contents()) if kv_field else n_head
    kv = n_kv * (d // n_head)

    w = GGUFWriter(dst, arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.alignment") or name.startswith("moellava."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(name, f.contents(), vtype, sub_type=sub)

    for t in r.tensors:
        data = np.array(t.data)
        if arch in SPLIT_FAMILIES and ".attn_qkv." in t.name:
            if data.dtype not in (np.float32, np.float16):
                sys.exit(f"{t.name}: {t.tensor_type.name}; give an f32 or f16 file (rows are split exactly)")
            parts = np.split(data, [d, d + kv], axis=0)
            for p, part in zip("qkv", parts):
                w.add_tensor(t.name.replace("attn_qkv", f"attn_{p}"), np.ascontiguousarray(part))
        else:
            w.add_tensor(t.name, data, raw_shape=list(reversed([int(x) for x in t.shape])) if data.dtype == np.uint8 else None,
                         raw_dtype=t.tensor_type if data.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
