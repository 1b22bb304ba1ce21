#!/usr/bin/env python3
"""Token ids of a corpus from the ORIGINAL tokenizer files, through the reference libraries, compared
with the ids moellava's runtime tokenizer (rebuilt from the converted GGUF) produced.

  tokenizer_reference.py FAMILY MODEL_DIR CORPUS.json OURS.json

FAMILY phi2:     transformers' slow CodeGenTokenizer (AutoTokenizer, use_fast=False), as MoE-LLaVA loads it.
FAMILY stablelm: tiktoken with Arcade100k's split pattern and its 32 special tokens from len(ranks)+1,
                 after NFC normalisation, special tokens allowed (Arcade100kTokenizer.tokenize).
FAMILY qwen:     tiktoken with Qwen's pattern and its 208 special tokens from len(ranks), NFC, specials
                 allowed (QWenTokenizer.tokenize).
Exit 0 when every string gives identical ids; otherwise prints the differences and exits 1.
"""
import base64
import json
import sys
import unicodedata

PAT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
ARCADE = (["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<gh_stars>", "<filename>",
           "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>", "<jupyter_code>",
           "<jupyter_output>", "<empty_output>", "<commit_before>", "<commit_msg>", "<commit_after>", "<reponame>",
           "<|endofprompt|>", "<|im_start|>", "<|im_end|>", "<|pause|>"] + [f"<|reg{i}|>" for i in range(8)] + ["<|extra0|>"])
QWEN = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]


def tiktoken_encoder(path: str, specials: list[str], offset: int):
    import tiktoken
    with open(path, "rb") as f:
        ranks = {base64.b64decode(t): int(r) for t, r in (line.split() for line in f.read().splitlines() if line)}
    start = len(ranks) + offset
    enc = tiktoken.Encoding("ref", pat_str=PAT, mergeable_ranks=ranks, special_tokens={s: start + i for i, s in enumerate(specials)})
    return lambda s: enc.encode(unicodedata.normalize("NFC", s), allowed_special="all", disallowed_special=())


def main() -> int:
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    family, model_dir, corpus_path, ours_path = sys.argv[1:]
    if family == "phi2":
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(model_dir, use_fast=False)
        encode = lambda s: tok(s).input_ids  # noqa: E731
    elif family == "stablelm":
        encode = tiktoken_encoder(f"{model_dir}/arcade100k.tiktoken", ARCADE, 1)
    elif family == "qwen":
        encode = tiktoken_encoder(f"{model_dir}/qwen.tiktoken", QWEN, 0)
    else:
        sys.exit(f"unknown family {family}")
    corpus = json.load(open(corpus_path, encoding="utf-8"))
    ours = json.load(open(ours_path))
    bad = 0
    for text, got in zip(corpus, ours, strict=True):
        want = encode(text)
        if want != got:
            bad += 1
            print(f"{family}: {text!r}\n  reference {want}\n  moellava  {got}")
    print(f"{family}: {len(corpus) - bad}/{len(corpus)} strings identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
