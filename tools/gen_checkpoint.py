#!/usr/bin/env python3
"""Small random MoE-LLaVA checkpoints in the exact Hugging Face layout of each released family.

No real weights can be downloaded where moellava is built and tested, so every test that reads a
checkpoint reads one of these: random weights, but the real tensor names, config.json fields, shard
layout and tokenizer file formats of the releases (moellava-spec.md §1–§3):

  --backbone phi2      MoE-LLaVA-Phi2-2.7B-4e layout   (vocab.json + merges.txt + added_tokens.json)
  --backbone stablelm  MoE-LLaVA-StableLM-1.6B-4e      (arcade100k.tiktoken)
  --backbone qwen      MoE-LLaVA-Qwen-1.8B-4e          (qwen.tiktoken)
  --tower clip|siglip  CLIP-L/14-336 (CLIPModel) or SigLIP-so400m-384 (SiglipModel) layout, written as
                       a separate directory with its text-side tensors (which a converter must skip)
  --dense              the stage-2 dense LLaVA checkpoint of the backbone (no MoE layers)

Output (DIR = --out):
  DIR/model/                       config.json, generation_config.json, safetensors shards +
                                   model.safetensors.index.json (a MoE layer split across the two
                                   shards), tokenizer files, tokenizer_config.json
  DIR/<org>/<tower-name>/          the tower, where config.json's `mm_image_tower` names it
                                   (e.g. DIR/openai/clip-vit-large-patch14-336): it resolves relative
                                   to the checkpoint's parent directory, as a converter should try
  (--hf-cache C puts the tower in C/hub/models--ORG--NAME/snapshots/<rev>/ instead)

Dimensions are small (hidden 256) and deliberately unlike the real ones so hard-coded constants fail:
Phi partial_rotary_factor 0.375 (real 0.4); StableLM rope_pct 0.5 with 4 KV heads for 8 heads (real
0.25, no GQA); Qwen MoE on odd layers [1, 3] (real: even); CLIP width 192 on a 56-px image (4x4 patches),
SigLIP width 160 on a 70-px image (5x5 patches); vocabularies of about 1-1.4k tokens trained here.

Tokenizer rules kept from the real releases (the vocabularies are tiny, the file formats real):
  Phi:      GPT-2 byte-level BPE; <|endoftext|> last in vocab.json; added_tokens.json = whitespace runs
            + <|extra_0|>; len(tokenizer) = vocab + added.
  StableLM: Arcade100k: 32 special tokens from id len(ranks)+1 (the real file: 100256 ranks → 100257,
            the constant upstream hard-codes); len(tokenizer) = last special + 1.
  Qwen:     <|endoftext|>, <|im_start|>, <|im_end|>, <|extra_0..204|> from id len(ranks) (real: 151643).
  Embedding and lm_head rows are padded above len(tokenizer) to a multiple of 64, as in the releases.

Deterministic: the same arguments always write the same bytes (numpy + safetensors only; BF16 is
written by hand since numpy has no bfloat16).

Examples:
  python tools/gen_checkpoint.py --backbone phi2 --tower clip --out /tmp/ckpt/phi2-clip
  python tools/gen_checkpoint.py --backbone qwen --tower siglip --dense --single-file --out /tmp/q
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import struct
import sys
from collections import Counter
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------------------------------
# Model families

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")

BACKBONES = {
    "phi2": dict(
        model_type="moe_llava_phi", dense_model_type="llava_phi",
        architectures="MoELLaVAPhiForCausalLM", dense_architectures="LlavaPhiForCausalLM",
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
        partial_rotary_factor=0.375, layer_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048,
        moe_layers_idx=[0, 2], n_merges=700, prefix="model",
    ),
    "stablelm": dict(
        model_type="moe_llava_stablelm", dense_model_type="llava_stablelm",
        architectures="MoELLaVAStablelmForCausalLM", dense_architectures="LlavaStablelmForCausalLM",
        hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, intermediate_size=768,
        rope_pct=0.5, norm_eps=1e-5, rope_theta=10000, max_position_embeddings=4096,
        moe_layers_idx=[0, 2], n_merges=800, prefix="model",
    ),
    "qwen": dict(
        model_type="moe_llava_qwen", dense_model_type="llava_qwen",
        architectures="MoELLaVAQWenForCausalLM", dense_architectures="LlavaQWenForCausalLM",
        hidden_size=256, num_hidden_layers=4, num_attention_heads=2, kv_channels=128, intermediate_size=1024,
        rotary_pct=1.0, layer_norm_epsilon=1e-6, rotary_emb_base=10000, max_position_embeddings=8192,
        moe_layers_idx=[1, 3], n_merges=900, prefix="transformer",
    ),
}

TOWERS = {
    "clip": dict(hub="openai/clip-vit-large-patch14-336", hidden_size=192, intermediate_size=768,
                 num_attention_heads=3, num_hidden_layers=3, image_size=56, patch_size=14,
                 hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711]),
    "siglip": dict(hub="google/siglip-so400m-patch14-384", hidden_size=160, intermediate_size=320,
                   num_attention_heads=5, num_hidden_layers=3, image_size=70, patch_size=14,
                   hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
}

N_EXPERTS = 4

# ----------------------------------------------------------------------------------------------------
# Tokenizer: a byte-level BPE trained here on a fixed corpus, written in each family's file format

CORPUS = SYSTEM + """
USER: <image>
Is there a chair in the image?
Answer the question using a single word or phrase. ASSISTANT: No
Is there a dining table in the image? Yes. Is there a person in the image? There is no dog.
person bicycle car motorcycle airplane bus train truck boat traffic light fire hydrant stop sign parking meter
bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie suitcase frisbee
skis snowboard sports ball kite baseball bat baseball glove skateboard surfboard tennis racket bottle wine glass
cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot dog pizza donut cake chair couch
potted plant bed dining table toilet tv laptop mouse remote keyboard cell phone microwave oven toaster sink
refrigerator book clock vase scissors teddy bear hair drier toothbrush.
red green blue yellow purple orange black white circle square triangle star heart large small left right
The picture shows a red circle next to a blue square on a white background. A small green triangle is above
the yellow star, and the purple heart is partly hidden behind it. What is in the picture? Describe the scene.
How many objects are there? There are 3 objects: 1 circle, 2 squares, 10 triangles, 42 stars and 2024 hearts.
The quick brown fox jumps over the lazy dog. It's what they've said: I'd say we'll see, you're right, I'm sure.
def forward(self, x):
    return self.fc2(gelu(self.fc1(x)))  # comments, (parentheses), [brackets] {braces} <tags> and "quotes"!?
    if x > 0 and y < 1: print("x = %d, y = %.3f" % (x, y))
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.718 -1 +2 50% $5 #1 @home ~tilde `code` ^caret &and |pipe
Non-ASCII: café naïve résumé Zürich 日本語のテキスト 中文 한국어 Ελληνικά русский текст emoji 🙂 ✓ — “quoted” ‘single’
Whitespace:    four spaces		two tabs
new lines

and blank lines.
Common words: about above across after again against almost alone along already also although always among
another answer anything appear around asked became because become before began behind being believe below
beside between beyond bottom bright brought building called cannot carry center certain change children city
close cold color common complete contain corner country course cover cross current dark different distance
during early earth either enough evening every example family famous field figure finally finger follow
forest forward friend front garden general glass ground group growing half happen heard heavy height himself
history however hundred idea important inside instead island itself kitchen known language later learn leave
letter light little living longer machine matter maybe measure middle minute moment morning mountain movement
music narrow nature nearly never night nothing notice number object ocean office often order outside paper
party pattern people perhaps period picture piece place plain plant player point position possible power
present pretty problem question quickly rather reason record remember report result river round second
several shape short should shown simple since single sister something sometimes sound space special spring
station still stone story street strong student study summer surface system table teacher thousand through
together toward travel under until usually village voice water weather window winter within without woman
wonder wooden world yellow young zebra crossing through wheels windows mirrors handles shadows reflections
""" * 2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (printable bytes map to themselves)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BYTE_ENCODER = bytes_to_unicode()
BYTE_ORDER = list(BYTE_ENCODER.keys())   # GPT-2 vocabulary order of the 256 byte tokens
# Each family's vocabulary is trained on pieces split by (a `re` approximation of) its own pre-tokenizer,
# as the real ones were: GPT-2's for Phi (digit runs, words), Qwen's for the tiktoken families (single
# digits, punctuation-prefixed words). So a runtime that splits with the wrong pattern gives other ids.
TRAIN_SPLIT = {
    "gpt2": re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""),
    "qwen": re.compile(r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|(?:[^\r\n\w]|_)?[^\W\d_]+|\d| ?(?:[^\s\w]|_)+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""),
}


def train_bpe(n_merges: int, split: str, corpus: str = CORPUS) -> list[tuple[bytes, bytes]]:
    """Byte-level BPE on `corpus`: the most frequent adjacent pair is merged, ties broken by the pair's bytes."""
    words = Counter(m.group(0).encode("utf-8") for m in TRAIN_SPLIT[split].finditer(corpus))
    seqs = {w: [bytes([b]) for b in w] for w in words}
    merges = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for w, seq in seqs.items():
            for a, b in zip(seq, seq[1:]):
                pairs[(a, b)] += words[w]
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        joined = best[0] + best[1]
        for w, seq in seqs.items():
            i, out = 0, []
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    if len(merges) != n_merges:
        raise SystemExit(f"corpus too small for {n_merges} merges (got {len(merges)})")
    return merges


def ranked_tokens(merges: list[tuple[bytes, bytes]]) -> list[bytes]:
    """Token byte strings by rank: the 256 bytes in GPT-2 order, then one token per merge."""
    return [bytes([b]) for b in BYTE_ORDER] + [a + b for a, b in merges]


def unicode_token(t: bytes) -> str:
    return "".join(BYTE_ENCODER[b] for b in t)


ARCADE_SPECIALS = (["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>"]
                   + ["<gh_stars>", "<filename>", "<issue_start>", "<issue_comment>", "<issue_closed>",
                      "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<empty_output>",
                      "<commit_before>", "<commit_msg>", "<commit_after>", "<reponame>"]
                   + ["<|endofprompt|>", "<|im_start|>", "<|im_end|>", "<|pause|>"]
                   + [f"<|reg{i}|>" for i in range(8)] + ["<|extra0|>"])
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
PHI_ADDED = [" " * n for n in range(8, 1, -1)] + ["\t" * n for n in range(4, 1, -1)] + ["<|extra_0|>"]


def tiktoken_file(tokens: list[bytes]) -> str:
    return "".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens))


def write_tokenizer(backbone: str, d: Path) -> dict:
    """Writes the family's tokenizer files; returns {len, eos, bos, pad} for config.json."""
    merges = train_bpe(BACKBONES[backbone]["n_merges"], "gpt2" if backbone == "phi2" else "qwen")
    tokens = ranked_tokens(merges)
    if backbone == "phi2":
        vocab = {unicode_token(t): i for i, t in enumerate(tokens)}
        eot = len(vocab)
        vocab["<|endoftext|>"] = eot
        (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        lines = ["#version: 0.2"] + [f"{unicode_token(a)} {unicode_token(b)}" for a, b in merges]
        (d / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        added = {t: eot + 1 + i for i, t in enumerate(PHI_ADDED)}
        (d / "added_tokens.json").write_text(json.dumps(added, ensure_ascii=False, indent=2))
        decoder = {str(eot): dict(content="<|endoftext|>", lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)}
        for t, i in added.items():
            special = t.startswith("<|")
            decoder[str(i)] = dict(content=t, lstrip=False, normalized=not special, rstrip=False, single_word=False, special=special)
        cfg = dict(add_prefix_space=False, added_tokens_decoder=decoder, bos_token="<|endoftext|>", clean_up_tokenization_spaces=True,
                   eos_token="<|endoftext|>", model_max_length=2048, tokenizer_class="CodeGenTokenizer", unk_token="<|endoftext|>")
        (d / "special_tokens_map.json").write_text(json.dumps(dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"), indent=2))
        n = eot + 1 + len(added)
        ids = dict(len=n, eos=eot, bos=eot, pad=None)
    elif backbone == "stablelm":
        (d / "arcade100k.tiktoken").write_text(tiktoken_file(tokens))
        start = len(tokens) + 1
        cfg = dict(auto_map={"AutoTokenizer": ["tokenization_arcade100k.Arcade100kTokenizer", None]}, clean_up_tokenization_spaces=True,
                   model_max_length=4096, tokenizer_class="Arcade100kTokenizer", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        ids = dict(len=start + len(ARCADE_SPECIALS), eos=start, bos=start, pad=start)
    else:
        (d / "qwen.tiktoken").write_text(tiktoken_file(tokens))
        start = len(tokens)
        cfg = dict(auto_map={"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}, clean_up_tokenization_spaces=True,
                   model_max_length=8192, tokenizer_class="QWenTokenizer")
        ids = dict(len=start + len(QWEN_SPECIALS), eos=start, bos=None, pad=None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2))
    return ids


# ----------------------------------------------------------------------------------------------------
# Weights

class Lazy:
    """A tensor to be made when written: its shape, and how to draw its values from a random generator.
    Values depend only on (--seed, the tensor's seed key), never on generation order, so a checkpoint of
    any size is written one tensor at a time and the checkpoint's tower copy equals the tower."""

    def __init__(self, shape, make, dtype="f32"):
        self.shape, self.make, self.dtype = tuple(int(d) for d in shape), make, dtype


class Init:
    """Initialisers with scales that keep activations O(1) through the network."""

    @staticmethod
    def normal(shape, std):
        return Lazy(shape, lambda rng: rng.standard_normal(shape, dtype=np.float32) * np.float32(std))

    def linear(self, out_f, in_f, gain=1.0):
        return self.normal((out_f, in_f), gain / np.sqrt(in_f))

    def bias(self, n):
        return self.normal((n,), 0.05)

    def ln_weight(self, n):
        return Lazy((n,), lambda rng: np.float32(1.0) + rng.standard_normal(n, dtype=np.float32) * np.float32(0.1))

    @staticmethod
    def const(value):
        return Lazy((), lambda rng: np.array(value, dtype=np.float32))


def llm_mlp(backbone: str, cfg: dict, init: Init, p: str) -> list[tuple[str, Lazy]]:
    """One dense MLP (or one expert) under prefix p, in the family's module names."""
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    if backbone == "phi2":
        return [(f"{p}.fc1.weight", init.linear(f, h)), (f"{p}.fc1.bias", init.bias(f)),
                (f"{p}.fc2.weight", init.linear(h, f)), (f"{p}.fc2.bias", init.bias(h))]
    if backbone == "stablelm":
        return [(f"{p}.gate_proj.weight", init.linear(f, h)), (f"{p}.up_proj.weight", init.linear(f, h)),
                (f"{p}.down_proj.weight", init.linear(h, f))]
    ff = f // 2   # Qwen: intermediate_size is the sum of w1 and w2 widths
    return [(f"{p}.w1.weight", init.linear(ff, h)), (f"{p}.w2.weight", init.linear(ff, h)),
            (f"{p}.c_proj.weight", init.linear(h, ff))]


def llm_block(backbone: str, cfg: dict, init: Init, i: int, moe: bool) -> list[tuple[str, Lazy]]:
    h = cfg["hidden_size"]
    t = []
    if backbone == "qwen":
        p = f"transformer.h.{i}"
        qkv = cfg["kv_channels"] * cfg["num_attention_heads"]
        t += [(f"{p}.ln_1.weight", init.ln_weight(h)),
              (f"{p}.attn.c_attn.weight", init.linear(3 * qkv, h)), (f"{p}.attn.c_attn.bias", init.bias(3 * qkv)),
              (f"{p}.attn.c_proj.weight", init.linear(h, qkv)), (f"{p}.ln_2.weight", init.ln_weight(h))]
    else:
        p = f"model.layers.{i}"
        heads = cfg["num_attention_heads"]
        hd = h // heads
        kv = cfg.get("num_key_value_heads", heads) * hd
        t += [(f"{p}.input_layernorm.weight", init.ln_weight(h)), (f"{p}.input_layernorm.bias", init.bias(h))]
        for name, out_f in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            t += [(f"{p}.self_attn.{name}.weight", init.linear(out_f, h)), (f"{p}.self_attn.{name}.bias", init.bias(out_f))]
        if backbone == "phi2":
            t += [(f"{p}.self_attn.dense.weight", init.linear(h, h)), (f"{p}.self_attn.dense.bias", init.bias(h))]
        else:
            t += [(f"{p}.self_attn.o_proj.weight", init.linear(h, h)),
                  (f"{p}.post_attention_layernorm.weight", init.ln_weight(h)), (f"{p}.post_attention_layernorm.bias", init.bias(h))]
    if moe:
        # Router gain 4: gate logits of a few units, so top-2 choices are clear-cut for most tokens.
        t.append((f"{p}.mlp.deepspeed_moe.gate.wg.weight", init.linear(N_EXPERTS, h, gain=4.0)))
        for e in range(N_EXPERTS):
            t += llm_mlp(backbone, cfg, init, f"{p}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}")
    else:
        t += llm_mlp(backbone, cfg, init, f"{p}.mlp")
    return t


def llm_tensors(backbone: str, cfg: dict, init: Init, vocab_rows: int, moe_layers: list[int]) -> list[tuple[str, Lazy]]:
    h = cfg["hidden_size"]
    emb_name = "transformer.wte.weight" if backbone == "qwen" else "model.embed_tokens.weight"
    t = [(emb_name, init.normal((vocab_rows, h), 1.0))]
    for i in range(cfg["num_hidden_layers"]):
        t += llm_block(backbone, cfg, init, i, i in moe_layers)
    if backbone == "qwen":
        t.append(("transformer.ln_f.weight", init.ln_weight(h)))
    else:
        norm = "model.final_layernorm" if backbone == "phi2" else "model.norm"
        t += [(f"{norm}.weight", init.ln_weight(h)), (f"{norm}.bias", init.bias(h))]
    # lm_head gain 3: logits spread over a few units, so greedy choices are not coin flips.
    t.append(("lm_head.weight", init.linear(vocab_rows, h, gain=3.0)))
    return t


def projector_tensors(prefix: str, mm_hidden: int, h: int, init: Init) -> list[tuple[str, Lazy]]:
    p = f"{prefix}.mm_projector.image_spatial_proj"
    return [(f"{p}.0.weight", init.linear(h, mm_hidden)), (f"{p}.0.bias", init.bias(h)),
            (f"{p}.2.weight", init.linear(h, h)), (f"{p}.2.bias", init.bias(h))]


def vision_tensors(tower: str, tc: dict, init: Init, prefix: str = "") -> list[tuple[str, Lazy]]:
    """The vision half of CLIPModel / SiglipModel (`vision_model.*`), optionally under a prefix."""
    w, f = tc["hidden_size"], tc["intermediate_size"]
    n_pos = (tc["image_size"] // tc["patch_size"]) ** 2
    p = f"{prefix}vision_model"
    t = []
    patch = init.normal((w, 3, tc["patch_size"], tc["patch_size"]), 1.0 / np.sqrt(3 * tc["patch_size"] ** 2))
    if tower == "clip":
        t += [(f"{p}.embeddings.class_embedding", init.normal((w,), 1.0)),
              (f"{p}.embeddings.patch_embedding.weight", patch),
              (f"{p}.embeddings.position_embedding.weight", init.normal((n_pos + 1, w), 0.5)),
              (f"{p}.pre_layrnorm.weight", init.ln_weight(w)), (f"{p}.pre_layrnorm.bias", init.bias(w))]
    else:
        t += [(f"{p}.embeddings.patch_embedding.weight", patch), (f"{p}.embeddings.patch_embedding.bias", init.bias(w)),
              (f"{p}.embeddings.position_embedding.weight", init.normal((n_pos, w), 0.5))]
    for i in range(tc["num_hidden_layers"]):
        q = f"{p}.encoder.layers.{i}"
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            t += [(f"{q}.self_attn.{name}.weight", init.linear(w, w)), (f"{q}.self_attn.{name}.bias", init.bias(w))]
        t += [(f"{q}.layer_norm1.weight", init.ln_weight(w)), (f"{q}.layer_norm1.bias", init.bias(w)),
              (f"{q}.mlp.fc1.weight", init.linear(f, w)), (f"{q}.mlp.fc1.bias", init.bias(f)),
              (f"{q}.mlp.fc2.weight", init.linear(w, f)), (f"{q}.mlp.fc2.bias", init.bias(w)),
              (f"{q}.layer_norm2.weight", init.ln_weight(w)), (f"{q}.layer_norm2.bias", init.bias(w))]
    t += [(f"{p}.post_layernorm.weight", init.ln_weight(w)), (f"{p}.post_layernorm.bias", init.bias(w))]
    if tower == "siglip":   # the MAP head, unused by LLaVA
        hp = f"{p}.head"
        t += [(f"{hp}.probe", init.normal((1, 1, w), 1.0)),
              (f"{hp}.attention.in_proj_weight", init.linear(3 * w, w)), (f"{hp}.attention.in_proj_bias", init.bias(3 * w)),
              (f"{hp}.attention.out_proj.weight", init.linear(w, w)), (f"{hp}.attention.out_proj.bias", init.bias(w)),
              (f"{hp}.layernorm.weight", init.ln_weight(w)), (f"{hp}.layernorm.bias", init.bias(w)),
              (f"{hp}.mlp.fc1.weight", init.linear(f, w)), (f"{hp}.mlp.fc1.bias", init.bias(f)),
              (f"{hp}.mlp.fc2.weight", init.linear(w, f)), (f"{hp}.mlp.fc2.bias", init.bias(w))]
    return t


TEXT_CFG = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=1, vocab_size=100, max_position_embeddings=16)


def text_tower_tensors(tower: str, vision_width: int, init: Init) -> list[tuple[str, Lazy]]:
    """The text half of CLIPModel / SiglipModel: present in the hub repos, skipped by converters."""
    c = TEXT_CFG
    w = c["hidden_size"]
    t = [("text_model.embeddings.token_embedding.weight", init.normal((c["vocab_size"], w), 0.02)),
         ("text_model.embeddings.position_embedding.weight", init.normal((c["max_position_embeddings"], w), 0.02))]
    q = "text_model.encoder.layers.0"
    for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
        t += [(f"{q}.self_attn.{name}.weight", init.linear(w, w)), (f"{q}.self_attn.{name}.bias", init.bias(w))]
    t += [(f"{q}.mlp.fc1.weight", init.linear(c["intermediate_size"], w)), (f"{q}.mlp.fc1.bias", init.bias(c["intermediate_size"])),
          (f"{q}.mlp.fc2.weight", init.linear(w, c["intermediate_size"])), (f"{q}.mlp.fc2.bias", init.bias(w)),
          (f"{q}.layer_norm1.weight", init.ln_weight(w)), (f"{q}.layer_norm1.bias", init.bias(w)),
          (f"{q}.layer_norm2.weight", init.ln_weight(w)), (f"{q}.layer_norm2.bias", init.bias(w)),
          ("text_model.final_layer_norm.weight", init.ln_weight(w)), ("text_model.final_layer_norm.bias", init.bias(w))]
    if tower == "clip":
        t += [("visual_projection.weight", init.linear(32, vision_width)), ("text_projection.weight", init.linear(32, w)),
              ("logit_scale", init.const(2.6592))]
    else:
        t += [("text_model.head.weight", init.linear(w, w)), ("text_model.head.bias", init.bias(w)),
              ("logit_scale", init.const(2.3026)), ("logit_bias", init.const(-10.0))]
    return t


# ----------------------------------------------------------------------------------------------------
# safetensors, written by hand (numpy has no bfloat16)

def to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bits, round to nearest even (as torch does)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


ST_DTYPE = {"bf16": ("BF16", 2), "f16": ("F16", 2), "f32": ("F32", 4), "i64": ("I64", 8)}


def encode(a: np.ndarray, dtype: str) -> bytes:
    if dtype == "i64":
        return np.ascontiguousarray(a, dtype="<i8").tobytes()
    if dtype == "bf16":
        return to_bf16(a).astype("<u2").tobytes()
    if dtype == "f16":
        return a.astype("<f2").tobytes()
    return np.ascontiguousarray(a, dtype="<f4").tobytes()


def rng_for(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "little"))


def write_safetensors(path: Path, tensors: list[tuple[str, Lazy, str]], dtype: str, seed: int) -> int:
    """Writes (name, lazy, seed key) tensors: header first (sizes are known from shapes), then each
    tensor's data as it is drawn, so memory never holds more than one tensor."""
    header, offset, kinds = {"__metadata__": {"format": "pt"}}, 0, []
    for name, lz, _ in tensors:
        kind = "i64" if lz.dtype == "i64" else dtype
        st, size = ST_DTYPE[kind]
        n = int(np.prod(lz.shape, dtype=np.int64)) * size
        header[name] = {"dtype": st, "shape": list(lz.shape), "data_offsets": [offset, offset + n]}
        kinds.append(kind)
        offset += n
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for (name, lz, key), kind in zip(tensors, kinds):
            f.write(encode(lz.make(rng_for(seed, key)), kind))
    return offset


def write_sharded(d: Path, tensors: list[tuple[str, Lazy, str]], dtype: str, split_at: int | None, seed: int) -> None:
    if split_at is None:
        write_safetensors(d / "model.safetensors", tensors, dtype, seed)
        return
    shards = [tensors[:split_at], tensors[split_at:]]
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(d / name, shard, dtype, seed)
        weight_map.update({n: name for n, _, _ in shard})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------
# Configs

def model_config(backbone: str, tower: str, dense: bool, vocab_rows: int, tok: dict, args) -> dict:
    b, tc = BACKBONES[backbone], TOWERS[tower]
    cfg = {"_name_or_path": f"generated/{backbone}-{tower}{'-dense' if dense else ''}",
           "architectures": [b["dense_architectures" if dense else "architectures"]],
           "model_type": b["dense_model_type" if dense else "model_type"]}
    if backbone == "phi2":
        cfg.update(attention_dropout=0.0, bos_token_id=None, embd_pdrop=0.0, eos_token_id=None, hidden_act="gelu_new",
                   hidden_size=b["hidden_size"], initializer_range=0.02, intermediate_size=b["intermediate_size"],
                   layer_norm_eps=b["layer_norm_eps"], max_position_embeddings=b["max_position_embeddings"],
                   num_attention_heads=b["num_attention_heads"], num_hidden_layers=b["num_hidden_layers"],
                   num_key_value_heads=b["num_attention_heads"], partial_rotary_factor=b["partial_rotary_factor"],
                   qk_layernorm=False, resid_pdrop=0.1, rope_scaling=None, rope_theta=b["rope_theta"], tie_word_embeddings=False)
    elif backbone == "stablelm":
        cfg.update(bos_token_id=tok["bos"], eos_token_id=tok["eos"], hidden_act="silu", hidden_size=b["hidden_size"],
                   initializer_range=0.02, intermediate_size=b["intermediate_size"], max_position_embeddings=b["max_position_embeddings"],
                   norm_eps=b["norm_eps"], num_attention_heads=b["num_attention_heads"], num_hidden_layers=b["num_hidden_layers"],
                   num_key_value_heads=b["num_key_value_heads"], rope_pct=b["rope_pct"], rope_theta=b["rope_theta"],
                   tie_word_embeddings=False, use_qkv_bias=True)
    else:
        cfg.update(attn_dropout_prob=0.0, bf16=True, emb_dropout_prob=0.0, fp16=False, fp32=False, hidden_size=b["hidden_size"],
                   initializer_range=0.02, intermediate_size=b["intermediate_size"], kv_channels=b["kv_channels"],
                   layer_norm_epsilon=b["layer_norm_epsilon"], max_position_embeddings=b["max_position_embeddings"], no_bias=True,
                   num_attention_heads=b["num_attention_heads"], num_hidden_layers=b["num_hidden_layers"], onnx_safe=None,
                   pad_token_id=tok["len"] - 205, rotary_emb_base=b["rotary_emb_base"], rotary_pct=b["rotary_pct"],
                   scale_attn_weights=True, seq_length=8192, softmax_in_fp32=False, tie_word_embeddings=False,
                   use_cache_kernel=False, use_cache_quantization=False, use_dynamic_ntk=True, use_flash_attn=False, use_logn_attn=True)
    cfg.update(freeze_mm_mlp_adapter=False, image_aspect_ratio="pad", image_projector_type="mlp2x_gelu", mm_hidden_size=tc["hidden_size"],
               mm_image_tower=tc["hub"], mm_projector_lr=None, mm_use_im_patch_token=False, mm_use_im_start_end=False,
               mm_video_tower=None, mm_vision_select_feature="patch", mm_vision_select_layer=-2, tokenizer_model_max_length=None,
               tokenizer_padding_side="right", torch_dtype={"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[args.dtype],
               transformers_version="4.37.0", tune_mm_mlp_adapter=False, use_cache=True, use_mm_proj=True, vocab_size=vocab_rows)
    if not dense:
        moe_layers = args.moe_layers if args.moe_layers is not None else b["moe_layers_idx"]
        cfg["moe"] = dict(capacity_factor=1.5, ep_size=1, eval_capacity_factor=args.eval_capacity_factor, min_capacity=args.min_capacity,
                          moe_enable=True, moe_layers_idx=moe_layers, moe_mode="sparse", num_experts=[N_EXPERTS] * len(moe_layers),
                          router_aux_loss_coef=0.01, top_k_experts=2, train_modules=["fc1", "fc2", "wg"] if backbone == "phi2" else [],
                          use_residual=False)
    return dict(sorted(cfg.items()))


def tower_config(tower: str) -> tuple[dict, dict]:
    tc = TOWERS[tower]
    vision = {k: tc[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "image_size",
                                 "patch_size", "hidden_act", "layer_norm_eps")}
    text = dict(TEXT_CFG)
    if tower == "clip":
        vision.update(model_type="clip_vision_model", projection_dim=32, num_channels=3, attention_dropout=0.0, initializer_factor=1.0)
        text.update(model_type="clip_text_model", projection_dim=32, hidden_act="quick_gelu")
        cfg = dict(architectures=["CLIPModel"], model_type="clip", projection_dim=32, logit_scale_init_value=2.6592,
                   text_config=text, vision_config=vision, initializer_factor=1.0, torch_dtype="float32", transformers_version="4.37.0")
        pre = dict(crop_size=tc["image_size"], do_center_crop=True, do_normalize=True, do_resize=True,
                   feature_extractor_type="CLIPFeatureExtractor", image_mean=tc["mean"], image_std=tc["std"], resample=3, size=tc["image_size"])
    else:
        vision.update(model_type="siglip_vision_model", num_channels=3, attention_dropout=0.0)
        text.update(model_type="siglip_text_model", hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
        cfg = dict(architectures=["SiglipModel"], model_type="siglip", initializer_factor=1.0, text_config=text, vision_config=vision,
                   torch_dtype="float32", transformers_version="4.37.0")
        pre = dict(do_normalize=True, do_rescale=True, do_resize=True, image_mean=tc["mean"], image_processor_type="SiglipImageProcessor",
                   image_std=tc["std"], processor_class="SiglipProcessor", resample=3, rescale_factor=1 / 255,
                   size=dict(height=tc["image_size"], width=tc["image_size"]))
    return cfg, pre


# ----------------------------------------------------------------------------------------------------

# Sizes: tiny (tests), medium (a conversion that takes a moment: the Ctrl-C test), real (the released
# dimensions of spec §1.1, for benchmarks; about 11 GB of BF16 for Phi2-4e, written one tensor at a time).
SIZES = {
    "tiny": ({}, {}),
    "medium": ({"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072, "kv_channels": 64}, {}),
    "real": (
        {
            "phi2": dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, intermediate_size=10240,
                         partial_rotary_factor=0.4, moe_layers_idx=list(range(0, 32, 2)), vocab_rows=51200),
            "stablelm": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                             intermediate_size=5632, rope_pct=0.25, moe_layers_idx=list(range(0, 24, 2)), vocab_rows=100352),
            "qwen": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, kv_channels=128, intermediate_size=11008,
                         moe_layers_idx=list(range(0, 24, 2)), vocab_rows=151936),
        },
        {
            "clip": dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24, image_size=336),
            "siglip": dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, num_hidden_layers=27, image_size=384),
        },
    ),
}


def sized(size: str, backbone: str, tower: str) -> tuple[dict, dict]:
    llm_over, tower_over = SIZES[size]
    b = dict(BACKBONES[backbone])
    b.update(llm_over.get(backbone, llm_over) if size == "real" else {k: v for k, v in llm_over.items() if k in b})
    tc = dict(TOWERS[tower])
    tc.update(tower_over.get(tower, {}))
    return b, tc


def keyed(tensors: list[tuple[str, Lazy]], scope: str, strip: str = "") -> list[tuple[str, Lazy, str]]:
    """Attaches each tensor's seed key: scope + name (without `strip`, so a copied tower draws the same values)."""
    return [(n, lz, f"{scope}/{n[len(strip):] if strip and n.startswith(strip) else n}") for n, lz in tensors]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--backbone", choices=sorted(BACKBONES), required=True)
    ap.add_argument("--tower", choices=sorted(TOWERS), required=True)
    ap.add_argument("--dense", action="store_true", help="stage-2 dense LLaVA checkpoint (no MoE layers)")
    ap.add_argument("--out", type=Path, required=True, help="output directory (model/ and the tower beside it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny", help="tiny (tests), medium, or real (the released dimensions)")
    ap.add_argument("--dtype", choices=["bf16", "f16", "f32"], default="bf16")
    ap.add_argument("--single-file", action="store_true", help="one model.safetensors instead of two shards")
    ap.add_argument("--tower-copy", action="store_true", help="also store the tower inside the checkpoint (model.image_tower.image_tower.*)")
    ap.add_argument("--hf-cache", type=Path, help="write the tower into a Hugging Face cache at this root instead of beside the model")
    ap.add_argument("--moe-layers", type=lambda s: [int(x) for x in s.split(",")], help="override moe_layers_idx, e.g. 0,1")
    ap.add_argument("--eval-capacity-factor", type=float, default=2.0, help="below 2.0 the top-2 gate drops tokens at inference")
    ap.add_argument("--min-capacity", type=int, default=0)
    args = ap.parse_args()

    b, tc = sized(args.size, args.backbone, args.tower)
    BACKBONES[args.backbone], TOWERS[args.tower] = b, tc
    model_dir = args.out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    tok = write_tokenizer(args.backbone, model_dir)
    vocab_rows = max(-(-tok["len"] // 64) * 64, b.get("vocab_rows", 0))
    moe_layers = [] if args.dense else (args.moe_layers if args.moe_layers is not None else b["moe_layers_idx"])
    if any(i < 0 or i >= b["num_hidden_layers"] for i in moe_layers):
        sys.exit(f"--moe-layers {moe_layers} outside 0..{b['num_hidden_layers'] - 1}")

    init = Init()
    scope = f"{args.backbone}/{'dense' if args.dense else 'moe'}"
    tensors = keyed(llm_tensors(args.backbone, b, init, vocab_rows, moe_layers), scope)
    head = tensors.pop()     # lm_head goes last, after the projector, as in the module order
    tensors += keyed(projector_tensors(b["prefix"], tc["hidden_size"], b["hidden_size"], init), f"{args.backbone}/{args.tower}/proj")
    if args.tower_copy:
        prefix = f"{b['prefix']}.image_tower.image_tower."
        tensors += keyed(vision_tensors(args.tower, tc, init, prefix=prefix), args.tower, strip=prefix)
    tensors.append(head)
    split_at = None
    if not args.single_file:
        # Split inside the experts of the last MoE layer (or mid-way through a dense checkpoint).
        marker = "deepspeed_experts.2." if moe_layers else None
        idx = [i for i, (n, _, _) in enumerate(tensors) if marker and marker in n and f".{moe_layers[-1]}.mlp." in n]
        split_at = idx[0] if idx else len(tensors) // 2
    write_sharded(model_dir, tensors, args.dtype, split_at, args.seed)

    cfg = model_config(args.backbone, args.tower, args.dense, vocab_rows, tok, args)
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {"_from_model_config": True, "transformers_version": "4.37.0"}
    if tok["eos"] is not None and args.backbone != "phi2":
        gen.update(bos_token_id=tok["bos"], eos_token_id=tok["eos"])
    (model_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

    if args.hf_cache:
        org, name = tc["hub"].split("/")
        tower_dir = args.hf_cache / "hub" / f"models--{org}--{name}" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    else:
        tower_dir = args.out / tc["hub"]
    tower_dir.mkdir(parents=True, exist_ok=True)
    tcfg, pre = tower_config(args.tower)
    (tower_dir / "config.json").write_text(json.dumps(tcfg, indent=2) + "\n")
    (tower_dir / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    tower_tensors = keyed(vision_tensors(args.tower, tc, init), args.tower)
    if args.tower == "clip":
        n_pos = (tc["image_size"] // tc["patch_size"]) ** 2 + 1
        ids = Lazy((1, n_pos), lambda rng: np.arange(n_pos, dtype=np.int64)[None, :], dtype="i64")
        tower_tensors.append(("vision_model.embeddings.position_ids", ids, "ids"))
    tower_tensors += keyed(text_tower_tensors(args.tower, tc["hidden_size"], init), f"{args.tower}/text")
    write_safetensors(tower_dir / "model.safetensors", tower_tensors, "f32", args.seed)
    print(f"wrote {model_dir} ({len(tensors)} tensors, len(tokenizer) = {tok['len']}, vocab rows {vocab_rows}) and tower {tower_dir}")


if __name__ == "__main__":
    main()
