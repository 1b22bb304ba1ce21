#!/usr/bin/env python3
"""Trains moellava-toy: a small MoE-LLaVA in MoE-LLaVA-Phi2's exact Hugging Face layout, on the
shapes world (tools/shapes_world), so that "quantized vs FP16 POPE" is a real measurement and the demo
answers sensibly. A toy: 64-pixel pictures of coloured shapes, not photographs.

Architecture (every matrix multiple of 256 on the language side, so every quant type applies to the
experts): CLIP-layout tower (64 px, patch 16 → 16 patches, width 128, 3 layers, quick-GELU; features
from layer −2, class token dropped) → mlp2x_gelu projector → Phi-2-layout language model (hidden 256,
4 layers, 4 heads of 64 with rotary on 32 dims, GELU-tanh MLP 512, LayerNorm, parallel block) with MoE on layers
0 and 2: 4 experts, top-2, DeepSpeed-style gate (fp32 softmax; Gumbel-sampled second expert while
training, as MoE-LLaVA trains) and MoE-Tuning's load-balancing loss (router_aux_loss_coef 0.01).

Data: pictures drawn on the fly from seeds disjoint from the test split's; each example is one of
  POPE-style    "Is there a {colour} {shape} in the image?\\nAnswer the question using a single word or
                phrase." → "Yes" / "No" (negatives: random classes, and near misses that share the colour
                or the shape with an object present)
  long answer   the same question without the instruction → "Yes, there is a … in the image." / "No, …"
  caption       "What is in the picture?" / "Describe the image." → "A red circle, a blue star and …"
in the conversation template (conv_phi), loss on the answer and its <|endoftext|> only, averaged per
example (a one-word answer weighs as much as a caption).

Training-only heads, not part of the exported model: on the tower, per-patch class logits pooled over
the patches (--presence-pool) against the classes present (binary cross-entropy), which teaches the tower
to see the objects quickly; on the language model, at the position that predicts the answer (after layer
1), linear probes for the classes present and for the class asked about, which make the picture and the
question meet early. Without them the language model sits on a constant answer for thousands of steps.

  .venv-reference/bin/python tools/train_toy/train.py OUT_DIR        # ~22 min on one core of the CI machine
writes OUT_DIR/model (config.json, model.safetensors BF16, vocab.json, merges.txt, added_tokens.json,
tokenizer_config.json) and OUT_DIR/shapes-clip-vit-b16-64 (the tower, CLIPVisionModel layout).
Deterministic for a seed and thread count.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tools/shapes_world"))
import gen_checkpoint as gc  # noqa: E402
import world  # noqa: E402

SYSTEM = gc.SYSTEM
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
TOWER = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_hidden_layers=3, image_size=64, patch_size=8,
             hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3, projection_dim=128)
PRESENCE_POOL = "mean"
LLM = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, partial_rotary_factor=0.5,
           layer_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048)
MOE_LAYERS, N_EXPERTS, AUX_COEF = [0, 2], 4, 0.01
CAPTION_SHARE = 0.25
PROBE_WEIGHT = 1.0
PROBE_LAYER = 2      # hidden_states index (output of layer 1) read by the training-only probes
TRAIN_SEED_BASE = 10_000_000          # test pictures use seeds near 424242 · 1000003


def tokenizer_corpus() -> str:
    rng = np.random.default_rng(1)
    lines = [SYSTEM + " USER: ", " ASSISTANT:", world.POPE_INSTRUCTION, "What is in the picture? Describe the image.", "Yes", "No"]
    for c in world.CLASSES:
        lines.append(f"Is there a {c} in the image? Yes, there is a {c} in the image. No, there is no {c} in the image.")
    for _ in range(300):
        _, objs = world.scene_objects(rng, 1, 4)
        lines.append(world.caption(objs))
    return "\n".join(lines) * 2 + "\n" + gc.CORPUS


class Tokenizer:
    """A GPT-2 byte-level BPE (Phi's file format), trained here on the template and the shapes world."""

    def __init__(self, n_merges: int = 420):
        self.merges = gc.train_bpe(n_merges, "gpt2", tokenizer_corpus())
        tokens = gc.ranked_tokens(self.merges)
        self.vocab = {gc.unicode_token(t): i for i, t in enumerate(tokens)}
        self.eot = len(self.vocab)
        self.vocab["<|endoftext|>"] = self.eot
        self.added = {t: self.eot + 1 + i for i, t in enumerate(gc.PHI_ADDED)}
        self.len = self.eot + 1 + len(self.added)
        self.ranks = {(a, b): i for i, (a, b) in enumerate((gc.unicode_token(a), gc.unicode_token(b)) for a, b in self.merges)}
        import regex
        self.pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def _bpe(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            r, i = min(pairs)
            if r == 1 << 30:
                break
            parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
        return parts

    def encode(self, text: str) -> list[int]:
        """GPT-2 byte-level BPE; added tokens (whitespace runs, <|endoftext|>) are split out first."""
        ids = []
        specials = sorted([*self.added, "<|endoftext|>"], key=len, reverse=True)
        i = 0
        buf = ""
        while i < len(text):
            hit = next((s for s in specials if text.startswith(s, i)), None)
            if hit:
                ids += self._plain(buf)
                buf = ""
                ids.append(self.added.get(hit, self.eot))
                i += len(hit)
            else:
                buf += text[i]
                i += 1
        return ids + self._plain(buf)

    def _plain(self, text: str) -> list[int]:
        out = []
        for m in self.pat.finditer(text):
            word = "".join(gc.BYTE_ENCODER[b] for b in m.group(0).encode("utf-8"))
            out += [self.vocab[p] for p in self._bpe(word)]
        return out

    def save(self, d: Path) -> None:
        (d / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False))
        (d / "merges.txt").write_text("\n".join(["#version: 0.2"] + [f"{gc.unicode_token(a)} {gc.unicode_token(b)}" for a, b in self.merges]) + "\n")
        (d / "added_tokens.json").write_text(json.dumps(self.added, ensure_ascii=False, indent=2))
        dec = {str(self.eot): dict(content="<|endoftext|>", lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)}
        for t, i in self.added.items():
            sp = t.startswith("<|")
            dec[str(i)] = dict(content=t, lstrip=False, normalized=not sp, rstrip=False, single_word=False, special=sp)
        cfg = dict(add_prefix_space=False, added_tokens_decoder=dec, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                   unk_token="<|endoftext|>", model_max_length=2048, tokenizer_class="CodeGenTokenizer", clean_up_tokenization_spaces=True)
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2))
        (d / "special_tokens_map.json").write_text(json.dumps(dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")))


class TrainMoE(nn.Module):
    """DeepSpeed-style top-2 MoE for training: fp32 gate, Gumbel-noised second choice, renormalised pair,
    load-balancing loss l_aux = E²·mean(mean(gates)·mean(top-1 mask)) (DeepSpeed top2gating)."""

    def __init__(self, dense_mlp: nn.Module, hidden: int):
        super().__init__()
        import copy
        self.wg = nn.Linear(hidden, N_EXPERTS, bias=False)
        nn.init.normal_(self.wg.weight, std=0.02)
        self.experts = nn.ModuleList([copy.deepcopy(dense_mlp) for _ in range(N_EXPERTS)])
        self.l_aux = torch.tensor(0.0)

    def forward(self, h):
        x = h.reshape(-1, h.shape[-1])
        logits = self.wg(x.float())
        gates = F.softmax(logits, dim=1)
        i1 = gates.argmax(1)
        mask1 = F.one_hot(i1, N_EXPERTS)
        noisy = logits + (-torch.log(-torch.log(torch.rand_like(logits).clamp_min(1e-9)))) if self.training else logits
        i2 = noisy.masked_fill(mask1.bool(), float("-inf")).argmax(1)
        self.l_aux = (gates.mean(0) * mask1.float().mean(0)).mean() * N_EXPERTS * N_EXPERTS
        g1, g2 = gates.gather(1, i1[:, None]).squeeze(1), gates.gather(1, i2[:, None]).squeeze(1)
        d = (g1 + g2).clamp_min(torch.finfo(gates.dtype).eps)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            for idx, w in ((i1, g1 / d), (i2, g2 / d)):
                rows = (idx == e).nonzero(as_tuple=True)[0]
                if rows.numel():
                    out.index_add_(0, rows, w[rows, None].to(x.dtype) * expert(x[rows]))
        return out.reshape(h.shape)


class Toy(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel, PhiConfig, PhiForCausalLM
        self.vision = CLIPVisionModel(CLIPVisionConfig(**TOWER, attn_implementation="eager"))
        h = LLM["hidden_size"]
        self.projector = nn.Sequential(nn.Linear(TOWER["hidden_size"], h), nn.GELU(), nn.Linear(h, h))
        cfg = PhiConfig(vocab_size=vocab, hidden_act="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
                        num_key_value_heads=LLM["num_attention_heads"], tie_word_embeddings=False, attn_implementation="eager",
                        **LLM)
        self.llm = PhiForCausalLM(cfg)
        nn.init.zeros_(self.llm.lm_head.bias)
        self.llm.lm_head.bias.requires_grad_(False)        # MoE-LLaVA's lm_head has no bias
        # Training-only: per-patch presence logits of the 20 classes, pooled over the patches (--presence-pool).
        self.presence = nn.Linear(TOWER["hidden_size"], len(world.CLASSES))
        self.patch_head = nn.Linear(TOWER["hidden_size"], len(world.CLASSES))     # stage 0 only: class per patch
        # Training-only probes on the language model at the position that predicts the answer: which classes the
        # picture holds, and which class the question asks about. They make the image and the question meet there
        # early, which breaks the long "always answer the same" plateau of plain next-token training.
        self.probe_seen = nn.Linear(h, len(world.CLASSES))
        self.probe_asked = nn.Linear(h, len(world.CLASSES))
        self.moe = []
        for i in MOE_LAYERS:
            m = TrainMoE(self.llm.model.layers[i].mlp, h)
            self.llm.model.layers[i].mlp = m
            self.moe.append(m)

    def tower_features(self, pixels):
        return self.vision(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]    # [B, P, 128]

    def presence_logits(self, feats):
        per_patch = self.presence(feats)                                                 # [B, P, 20]
        return per_patch.mean(dim=1) if PRESENCE_POOL == "mean" else per_patch.amax(dim=1)

    def image_embeds(self, pixels, with_presence: bool = False):
        feats = self.tower_features(pixels)
        emb = self.projector(feats)
        if with_presence:
            return emb, self.presence_logits(feats)
        return emb


def pixels_of(img) -> torch.Tensor:
    a = np.asarray(img, dtype=np.float64) * (1 / 255)
    a = (a.astype(np.float32) - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
    return torch.from_numpy(a.transpose(2, 0, 1).copy())


def example(rng: np.random.Generator, objects: list[dict]) -> tuple[str, str, int]:
    """(question, answer, index of the class asked about or -1 for a caption) about a picture with `objects`."""
    present = [o["name"] for o in objects]
    kind = rng.random()
    if kind < CAPTION_SHARE:
        q = "What is in the picture?" if rng.random() < 0.5 else "Describe the image."
        return q, world.caption(objects), -1
    yes = rng.random() < 0.5
    if yes:
        obj = present[rng.integers(0, len(present))]
    else:
        absent = [c for c in world.CLASSES if c not in present]
        near = [c for c in absent if any(c.split()[0] == p.split()[0] or c.split()[1] == p.split()[1] for p in present)]
        pool = near if (near and rng.random() < 0.6) else absent
        obj = pool[rng.integers(0, len(pool))]
    cls = world.CLASSES.index(obj)
    if kind < 0.85:
        return f"Is there a {obj} in the image?" + world.POPE_INSTRUCTION, "Yes" if yes else "No", cls
    long = f"Yes, there is a {obj} in the image." if yes else f"No, there is no {obj} in the image."
    return f"Is there a {obj} in the image?", long, cls


def patch_targets(objects: list[dict]) -> torch.Tensor:
    """[P, 20]: 1 where an object's disc covers part of the patch (4×4 sample points per patch)."""
    ps = TOWER["patch_size"]
    g = TOWER["image_size"] // ps
    t = torch.zeros(g * g, len(world.CLASSES))
    offs = (np.arange(4) + 0.5) * ps / 4
    for o in objects:
        cx, cy, r = o["center_radius"]
        k = world.CLASSES.index(o["name"])
        for gy in range(g):
            for gx in range(g):
                xs, ys = gx * ps + offs, gy * ps + offs
                if ((xs[None, :] - cx) ** 2 + (ys[:, None] - cy) ** 2 <= (0.8 * r) ** 2).any():
                    t[gy * g + gx, k] = 1.0
    return t


def pretrain_tower(model: Toy, pool, rng: np.random.Generator, steps: int, bs: int, lr: float, t0: float) -> None:
    """Stage 0, the stand-in for CLIP's pre-training: the tower alone learns where each class is (a
    per-patch head, dense targets from the object discs) and which classes the picture holds (the
    presence head over all patches), with large batches, before the language model ever sees it."""
    params = list(model.vision.parameters()) + list(model.presence.parameters()) + list(model.patch_head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    targets = torch.zeros(len(pool), len(world.CLASSES))
    for i, (_, objs) in enumerate(pool):
        for o in objs:
            targets[i, world.CLASSES.index(o["name"])] = 1.0
    dense = torch.stack([patch_targets(objs) for _, objs in pool])           # [N, P, 20]
    for step in range(1, steps + 1):
        idx = torch.from_numpy(rng.integers(0, len(pool), size=bs))
        feats = model.tower_features(torch.stack([pool[i][0] for i in idx]))
        logits = model.presence_logits(feats)
        loss = F.binary_cross_entropy_with_logits(logits, targets[idx])
        local = F.binary_cross_entropy_with_logits(model.patch_head(feats), dense[idx])
        opt.zero_grad()
        (loss + local).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == 1:
            exact = ((logits > 0).float() == targets[idx]).all(1).float().mean().item()
            print(f"tower step {step} presence {loss.item():.4f} patches {local.item():.4f} exact-set {exact:.3f} {time.time() - t0:.0f} s", flush=True)


def build_batch(model: Toy, tok: Tokenizer, pool, rng: np.random.Generator, bs: int):
    """Embeddings, labels and mask of `bs` examples, chunks tokenised around the image as the runtime does."""
    emb = model.llm.get_input_embeddings()
    idx = rng.integers(0, len(pool), size=bs)
    pixels = torch.stack([pool[i][0] for i in idx])
    img, presence = model.image_embeds(pixels, with_presence=True)         # [B, 64, H], [B, 20]
    present = torch.zeros(bs, len(world.CLASSES))
    for b, i in enumerate(idx):
        for o in pool[i][1]:
            present[b, world.CLASSES.index(o["name"])] = 1.0
    seqs, labels, last, asked = [], [], [], []
    for b, i in enumerate(idx):
        q, a, cls = example(rng, pool[i][1])
        asked.append(cls)
        head = tok.encode(f"{SYSTEM} USER: ")
        tail = tok.encode(f"\n{q} ASSISTANT:")
        ans = tok.encode(f" {a}") + [tok.eot]
        ids_tail = torch.tensor(tail + ans)
        seqs.append(torch.cat([emb(torch.tensor(head)), img[b], emb(ids_tail)]))
        labels.append(torch.tensor([-100] * (len(head) + img.shape[1] + len(tail)) + ans))
        last.append(len(head) + img.shape[1] + len(tail) - 1)
    t = max(s.shape[0] for s in seqs)
    x = torch.zeros(bs, t, seqs[0].shape[1])
    y = torch.full((bs, t), -100)
    mask = torch.zeros(bs, t, dtype=torch.long)
    for b, (s, l) in enumerate(zip(seqs, labels)):
        x[b, : s.shape[0]] = s
        y[b, : l.shape[0]] = l
        mask[b, : s.shape[0]] = 1
    return x, y, mask, F.binary_cross_entropy_with_logits(presence, present), present, torch.tensor(last), torch.tensor(asked)


@torch.no_grad()
def quick_eval(model: Toy, tok: Tokenizer, n: int = 240) -> float:
    """Yes/no accuracy of the first answer token on held-out pictures (POPE-style questions)."""
    model.eval()
    rng = np.random.default_rng(99)
    yes, no = tok.encode(" Yes")[0], tok.encode(" No")[0]
    correct = 0
    for k in range(n):
        img, _, objs = world.picture(TRAIN_SEED_BASE - 1 - k, 3, 4)
        q, a, _ = example(np.random.default_rng(k), objs)
        while not q.endswith(world.POPE_INSTRUCTION):
            q, a, _ = example(rng, objs)
        emb = model.llm.get_input_embeddings()
        x = torch.cat([emb(torch.tensor(tok.encode(f"{SYSTEM} USER: "))), model.image_embeds(pixels_of(img)[None])[0],
                       emb(torch.tensor(tok.encode(f"\n{q} ASSISTANT:")))])[None]
        logits = model.llm(inputs_embeds=x).logits[0, -1]
        correct += int((logits[yes] > logits[no]) == (a == "Yes"))
    model.train()
    return correct / n


def to_bf16_bytes(t: torch.Tensor) -> bytes:
    return t.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy().astype("<i2").tobytes()


def save_safetensors(path: Path, tensors: dict, dtype: str) -> None:
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for k, t in tensors.items():
        b = to_bf16_bytes(t) if dtype == "BF16" else t.detach().float().contiguous().numpy().astype("<f4").tobytes()
        header[k] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h)
        for b in blobs:
            f.write(b)


def export(model: Toy, tok: Tokenizer, out: Path, steps: int, accuracy: float) -> None:
    tower_name = f"shapes-clip-vit-b{TOWER['patch_size']}-{TOWER['image_size']}"
    mdir, tdir = out / "model", out / tower_name
    mdir.mkdir(parents=True, exist_ok=True)
    tdir.mkdir(parents=True, exist_ok=True)
    rows = -(-tok.len // 64) * 64
    sd = {}
    for k, v in model.llm.state_dict().items():
        if k == "lm_head.bias" or "rotary" in k:
            continue
        for li, m in zip(MOE_LAYERS, model.moe):
            p = f"model.layers.{li}.mlp."
            if k.startswith(p):
                rest = k[len(p):]
                k = p + ("deepspeed_moe.gate.wg.weight" if rest == "wg.weight" else "deepspeed_moe.experts.deepspeed_experts." + rest.split("experts.", 1)[1])
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            v = torch.cat([v, torch.zeros(rows - v.shape[0], v.shape[1])])     # padded rows, as the releases have
        sd[k] = v
    for k, v in model.projector.state_dict().items():
        sd[f"model.mm_projector.image_spatial_proj.{k}"] = v
    order = sorted(sd, key=lambda k: (k.startswith("lm_head"), k))
    save_safetensors(mdir / "model.safetensors", {k: sd[k] for k in order}, "BF16")
    tok.save(mdir)
    cfg = {"_name_or_path": "moellava-toy", "architectures": ["MoELLaVAPhiForCausalLM"], "model_type": "moe_llava_phi",
           "attention_dropout": 0.0, "bos_token_id": None, "eos_token_id": None, "embd_pdrop": 0.0, "hidden_act": "gelu_new",
           "initializer_range": 0.02, "num_key_value_heads": LLM["num_attention_heads"], "qk_layernorm": False, "resid_pdrop": 0.0,
           "rope_scaling": None, "tie_word_embeddings": False, **LLM,
           "image_aspect_ratio": "pad", "image_projector_type": "mlp2x_gelu", "mm_hidden_size": TOWER["hidden_size"],
           "mm_image_tower": tower_name, "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_video_tower": None,
           "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2, "tokenizer_padding_side": "right",
           "torch_dtype": "bfloat16", "transformers_version": "4.37.0", "use_cache": True, "vocab_size": rows,
           "moe": {"capacity_factor": 1.5, "ep_size": 1, "eval_capacity_factor": 2.0, "min_capacity": 0, "moe_enable": True,
                   "moe_layers_idx": MOE_LAYERS, "moe_mode": "sparse", "num_experts": [N_EXPERTS] * len(MOE_LAYERS),
                   "router_aux_loss_coef": AUX_COEF, "top_k_experts": 2, "train_modules": [], "use_residual": False},
           "moellava_toy": {"steps": steps, "heldout_yes_no_accuracy": accuracy}}
    (mdir / "config.json").write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")
    tv = {f"vision_model.{k}": v for k, v in model.vision.vision_model.state_dict().items() if "position_ids" not in k}
    save_safetensors(tdir / "model.safetensors", tv, "F32")
    (tdir / "config.json").write_text(json.dumps({"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", **TOWER}, indent=2) + "\n")
    (tdir / "preprocessor_config.json").write_text(json.dumps({"crop_size": 64, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                                                               "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": MEAN,
                                                               "image_std": STD, "resample": 3, "size": 64}, indent=2) + "\n")


def main() -> None:
    global PRESENCE_POOL, CAPTION_SHARE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--pool", type=int, default=20000, help="distinct training pictures")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it; the release used 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--patch", type=int, default=16, help="tower patch size (64-pixel pictures)")
    ap.add_argument("--presence-pool", choices=["max", "mean"], default="mean")
    ap.add_argument("--caption-share", type=float, default=CAPTION_SHARE)
    ap.add_argument("--tower-steps", type=int, default=3000, help="stage 0: tower-only presence training")
    ap.add_argument("--tower-batch", type=int, default=128)
    ap.add_argument("--tower-lr", type=float, default=6e-3)
    ap.add_argument("--stop-after-tower", action="store_true", help="(experiments) stop after stage 0")
    args = ap.parse_args()
    TOWER["patch_size"], PRESENCE_POOL, CAPTION_SHARE = args.patch, args.presence_pool, args.caption_share
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    tok = Tokenizer()
    pool = []
    for k in range(args.pool):
        img, _, objs = world.picture(TRAIN_SEED_BASE + k, 1, 4)
        pool.append((pixels_of(img), objs))
    print(f"tokenizer {tok.len} tokens; {len(pool)} pictures in {time.time() - t0:.0f} s", flush=True)
    model = Toy(tok.len)
    if args.tower_steps:
        pretrain_tower(model, pool, rng, args.tower_steps, args.tower_batch, args.tower_lr, t0)
    if args.stop_after_tower:
        return
    if args.tower_steps:
        # Stage 1, as MoE-LLaVA trains: the pre-trained tower is frozen; projector and language model learn.
        for p_ in [*model.vision.parameters(), *model.presence.parameters(), *model.patch_head.parameters()]:
            p_.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"{sum(p.numel() for p in params) / 1e6:.2f} M trainable parameters", flush=True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = 100
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    model.train()
    for step in range(1, args.steps + 1):
        x, y, mask, seen, present, last, asked = build_batch(model, tok, pool, rng, args.batch)
        out = model.llm(inputs_embeds=x, attention_mask=mask, output_hidden_states=True)
        logits = out.logits
        # Per-example mean over answer tokens, then mean over the batch: a one-token "Yes" counts as much as a caption.
        tok_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), y[:, 1:], ignore_index=-100, reduction="none")
        n_ans = (y[:, 1:] != -100).sum(1).clamp_min(1)
        lm = (tok_loss.sum(1) / n_ans).mean()
        hid = out.hidden_states[PROBE_LAYER][torch.arange(x.shape[0]), last]            # [B, H]
        probe = F.binary_cross_entropy_with_logits(model.probe_seen(hid), present)
        q_rows = asked >= 0
        if q_rows.any():
            probe = probe + F.cross_entropy(model.probe_asked(hid[q_rows]), asked[q_rows])
        aux = sum(m.l_aux for m in model.moe)
        loss = lm + AUX_COEF * aux + seen + PROBE_WEIGHT * probe
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == 1:
            print(f"step {step} loss {lm.item():.4f} aux {aux.item():.3f} presence {seen.item():.3f} probe {probe.item():.3f} lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:.0f} s", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            print(f"  held-out yes/no accuracy {quick_eval(model, tok):.3f}", flush=True)
    acc = quick_eval(model, tok, 480)
    print(f"final held-out yes/no accuracy {acc:.3f}; {time.time() - t0:.0f} s", flush=True)
    export(model, tok, args.out, args.steps, acc)


if __name__ == "__main__":
    main()
