"""Inputs exactly as MoE-LLaVA's eval and CLI make them (spec §5), through the upstream libraries.

- Image: PIL `.convert('RGB')` → `expand2square` with background tuple(int(x*255) for x in image_mean)
  (mm_utils.py) → the tower's transformers image processor (CLIPImageProcessor: resize shortest edge
  with PIL BICUBIC, centre crop, rescale 1/255, normalise; SiglipImageProcessor: resize to a square,
  rescale, normalise) → pixel values [3, H, W] float32.
- Prompt: conversation.py's SeparatorStyle.TWO template; `tokenizer_image_token`: the prompt is split
  at "<image>", every chunk tokenised separately by the family's original tokenizer, chunks joined by
  IMAGE_TOKEN_INDEX = -200, no BOS.
"""
import base64
import json
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_TOKEN_INDEX = -200
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
PAT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
ARCADE = (["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<gh_stars>", "<filename>",
           "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>", "<jupyter_code>",
           "<jupyter_output>", "<empty_output>", "<commit_before>", "<commit_msg>", "<commit_after>", "<reponame>",
           "<|endofprompt|>", "<|im_start|>", "<|im_end|>", "<|pause|>"] + [f"<|reg{i}|>" for i in range(8)] + ["<|extra0|>"])
QWEN = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]


def build_prompt(question: str, with_image: bool) -> str:
    """get_prompt() of conv_phi / conv_stablelm: system + ' USER: ' + msg + ' ASSISTANT:'."""
    msg = f"<image>\n{question}" if with_image else question
    return f"{SYSTEM} USER: {msg} ASSISTANT:"


class FamilyTokenizer:
    """The original tokenizer of a family, loaded from the checkpoint's own files."""

    def __init__(self, family: str, model_dir: Path):
        self.family = family
        if family == "phi2":
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(str(model_dir), use_fast=False)   # builder.py: use_fast=False
            self._encode = lambda s: tok(s).input_ids
            self.eos = tok.eos_token_id
            self.len = len(tok)
        else:
            import tiktoken
            name, specials, offset = ("arcade100k.tiktoken", ARCADE, 1) if family == "stablelm" else ("qwen.tiktoken", QWEN, 0)
            raw = (model_dir / name).read_bytes()
            ranks = {base64.b64decode(t): int(r) for t, r in (line.split() for line in raw.splitlines() if line)}
            start = len(ranks) + offset
            enc = tiktoken.Encoding(family, pat_str=PAT, mergeable_ranks=ranks, special_tokens={s: start + i for i, s in enumerate(specials)})
            self._encode = lambda s: enc.encode(unicodedata.normalize("NFC", s), allowed_special="all", disallowed_special=())
            self.eos = start
            self.len = start + len(specials)

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    def prompt_ids(self, prompt: str) -> list[int]:
        """tokenizer_image_token: chunks around <image> tokenised separately, joined by -200."""
        chunks = [self.encode(c) for c in prompt.split("<image>")]
        out = chunks[0]
        for c in chunks[1:]:
            out = out + [IMAGE_TOKEN_INDEX] + c
        return out


def expand2square(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    result = Image.new(img.mode, (side, side), background)
    result.paste(img, ((side - w) // 2, (side - h) // 2))
    return result


def pixel_values(image_path: Path, tower_dir: Path, kind: str) -> np.ndarray:
    """[3, H, W] float32, as process_images(..., image_aspect_ratio='pad') returns it."""
    pre = json.loads((tower_dir / "preprocessor_config.json").read_text())
    mean = pre["image_mean"]
    img = Image.open(image_path).convert("RGB")
    img = expand2square(img, tuple(int(x * 255) for x in mean))
    if kind == "clip":
        from transformers import CLIPImageProcessor
        proc = CLIPImageProcessor.from_pretrained(str(tower_dir))
    else:
        from transformers import SiglipImageProcessor
        proc = SiglipImageProcessor.from_pretrained(str(tower_dir))
    return proc.preprocess(img, return_tensors="np")["pixel_values"][0].astype(np.float32)
