"""moellava: run MoE-LLaVA vision-language models from Python, quantized, on a CPU, without PyTorch.

    import moellava
    m = moellava.Model("model.gguf", threads=2)
    a = m.ask("cat.jpg", "What is in the picture?", max_new_tokens=64)
    print(a.text, a.timings["decode_tokens_per_s"])
    for piece in m.stream("cat.jpg", "Describe it."):
        print(piece, end="", flush=True)
    logits = m.logits("cat.jpg", "Is there a cat in the image?")   # numpy float32, last prompt position

    moellava.convert("hf_dir", "out.gguf", experts="q4_k", dense="q8_0", vision_tower="clip_dir")
    moellava.pope_score("annotations/", "questions.jsonl", "answers.jsonl")   # as `pope score --json`

An image is a path (str or os.PathLike), the bytes of an image file (JPEG, PNG, WebP, BMP, GIF), a
PIL.Image (any mode; converted to RGB), or None for a text-only prompt. Questions are wrapped in the
model's conversation template exactly as `moellava run -p` wraps them; `raw_prompt=True` passes the
text verbatim (with at most one "<image>" tag).

Every computation releases the GIL, so threads can share one Model; Ctrl-C stops a generation at
its next token with KeyboardInterrupt. Errors are moellava.Error subclasses carrying the CLI's
messages: FormatError (a file is not what it should be), ModelError (the model cannot do what was
asked), ImageError (an image cannot be read); invalid argument values raise ValueError.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Union

from . import _moellava
from ._moellava import Error, FormatError, ImageError, ModelError

__version__: str = _moellava.__version__
__all__ = [
    "Model",
    "Answer",
    "Stream",
    "convert",
    "pope_score",
    "Error",
    "FormatError",
    "ModelError",
    "ImageError",
    "__version__",
]

ImageLike = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Any, None]


@dataclass(frozen=True)
class Answer:
    """One answer, in plain Python types.

    text: the answer, trimmed. tokens: the generated token ids. prompt_tokens / image_tokens: the
    prompt's positions and how many of them the image took. stop_reason: "eos", "stop_string" or
    "max_new_tokens". timings: seconds and tokens/s (image_encode_s, prefill_s, decode_s,
    prefill_tokens_per_s, decode_tokens_per_s). routing: per MoE layer, the two experts (and their
    gate weights) chosen for the last prompt token.
    """

    text: str
    tokens: List[int]
    prompt_tokens: int
    image_tokens: int
    stop_reason: str
    timings: Dict[str, float] = field(default_factory=dict)
    routing: List[Dict[str, Any]] = field(default_factory=list)

    @staticmethod
    def _from_json(s: str) -> "Answer":
        d = json.loads(s)
        return Answer(
            text=d["text"],
            tokens=list(d["tokens"]),
            prompt_tokens=d["prompt_tokens"],
            image_tokens=d["image_tokens"],
            stop_reason=d["stop_reason"],
            timings=dict(d["timings"]),
            routing=list(d["routing"]),
        )


def _image_args(image: ImageLike) -> Dict[str, Any]:
    """The native call's image arguments for any accepted image form."""
    if image is None:
        return {}
    if isinstance(image, (str, os.PathLike)):
        return {"image_path": os.fspath(image)}
    if isinstance(image, (bytes, bytearray, memoryview)):
        return {"image_bytes": bytes(image)}
    # A PIL.Image (duck-typed, so that Pillow stays optional).
    if hasattr(image, "convert") and hasattr(image, "tobytes") and hasattr(image, "size"):
        rgb = image.convert("RGB")
        width, height = rgb.size
        return {"image_rgb": (width, height, rgb.tobytes())}
    raise TypeError(
        f"image must be a path, the bytes of an image file, a PIL.Image or None, not {type(image).__name__}"
    )


class Stream:
    """An answer arriving piece by piece: iterate for the text; `answer` holds the whole Answer once
    the iteration has ended. Dropping the stream (or `cancel()`) stops the generation."""

    def __init__(self, native: Any) -> None:
        self._native = native

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        return next(self._native)

    @property
    def answer(self) -> Optional[Answer]:
        s = self._native.answer_json()
        return None if s is None else Answer._from_json(s)

    def cancel(self) -> None:
        self._native.cancel()


class Model:
    """A converted MoE-LLaVA (or dense LLaVA) GGUF file, loaded for answering.

    path: the GGUF from `moellava convert`. device: "cpu" (the only backend in this build).
    threads: worker threads (default: all cores); each Model has its own pool. kv_cache: "f16" or
    "f32" (default: f32 for f32 attention weights, else f16). expert_ram: keep at most this much
    expert weight in RAM ("512MiB", "2GB", "50%"), reading routed experts from the file on demand;
    expert_policy: "lru", "lfu" or "least-stale"; prefetch: guess and load the next MoE layer's
    experts early (needs expert_ram). The options mean what the CLI's flags of the same names mean.
    """

    def __init__(
        self,
        path: Union[str, "os.PathLike[str]"],
        device: str = "cpu",
        threads: Optional[int] = None,
        *,
        kv_cache: Optional[str] = None,
        expert_ram: Optional[str] = None,
        expert_policy: str = "lru",
        prefetch: bool = False,
    ) -> None:
        if device != "cpu":
            raise ModelError(
                f"device {device!r}: this build of moellava runs on the CPU only (device='cpu')"
            )
        self.path = os.fspath(path)
        self._native = _moellava.NativeModel(
            self.path,
            threads=threads,
            kv_cache=kv_cache,
            expert_ram=expert_ram,
            expert_policy=expert_policy,
            prefetch=prefetch,
        )
        self.info: Dict[str, Any] = json.loads(self._native.info_json())

    def __repr__(self) -> str:
        i = self.info
        moe = f", {len(i['moe_layers'])} MoE layers × {i['n_expert']} experts" if i["moe_layers"] else ""
        return f"moellava.Model({self.path!r}: {i['architecture']}, {i['n_layer']} layers{moe})"

    def ask(
        self,
        image: ImageLike,
        question: str,
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: int = 0,
        raw_prompt: bool = False,
        ignore_eos: bool = False,
    ) -> Answer:
        """Answers `question` about `image` (None: text only). temperature 0 is greedy decoding, what
        MoE-LLaVA's evaluation uses; above 0 it samples, reproducibly for a given seed. The options
        are `moellava run`'s: ignore_eos keeps generating past the end-of-text token."""
        s = self.stream(
            image,
            question,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            raw_prompt=raw_prompt,
            ignore_eos=ignore_eos,
        )
        for _ in s:
            pass
        answer = s.answer
        assert answer is not None, "an exhausted stream holds its answer"
        return answer

    def stream(
        self,
        image: ImageLike,
        question: str,
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: int = 0,
        raw_prompt: bool = False,
        ignore_eos: bool = False,
    ) -> Stream:
        """Like `ask`, but returns the text as it is generated (never half a character)."""
        native = self._native.stream(
            question,
            raw_prompt=raw_prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            ignore_eos=ignore_eos,
            **_image_args(image),
        )
        return Stream(native)

    def logits(self, image: ImageLike, prompt: str, *, raw_prompt: bool = False) -> "Any":
        """The float32 logits (numpy, len(tokenizer) values) of the last prompt position: the same
        numbers `moellava run --logits-out` writes for the same prompt and image."""
        import numpy as np

        b = self._native.logits_bytes(prompt, raw_prompt=raw_prompt, **_image_args(image))
        return np.frombuffer(b, dtype="<f4").copy()

    @property
    def expert_cache(self) -> Optional[Dict[str, Any]]:
        """The expert cache's counters (hits, misses, prefetches, bytes, per layer), or None
        without expert_ram."""
        return json.loads(self._native.expert_cache_json())


def convert(
    hf_dir: Union[str, "os.PathLike[str]"],
    output: Union[str, "os.PathLike[str]"],
    *,
    vision_tower: Union[str, "os.PathLike[str]", None] = None,
    preset: Optional[str] = None,
    type: Optional[str] = None,
    experts: Optional[str] = None,
    dense: Optional[str] = None,
    embeddings: Optional[str] = None,
    router: Optional[str] = None,
    vision: Optional[str] = None,
    projector: Optional[str] = None,
    split: bool = False,
    force: bool = False,
) -> List[str]:
    """Converts a Hugging Face MoE-LLaVA checkpoint (and its vision tower) into one GGUF file, as
    `moellava convert` does; returns the paths written. The keywords are the CLI's flags: `type` the
    type of every class (--type), `experts`, `dense`, `embeddings`, `router`, `vision`, `projector`
    one class each, `preset` a named plan (q4, q5, q8, f16). Types are ggml's names: f32 f16 bf16
    q8_0 q4_0 q4_1 q5_0 q5_1 q4_k q5_k q6_k. The vision tower is found from the checkpoint's config
    unless `vision_tower` names its directory. Raises FormatError for a broken checkpoint and
    ValueError for a bad choice (an unknown type, an existing output without force=True)."""
    paths = _moellava.convert(
        os.fspath(hf_dir),
        os.fspath(output),
        vision_tower=None if vision_tower is None else os.fspath(vision_tower),
        preset=preset,
        all=type,
        experts=experts,
        dense=dense,
        embeddings=embeddings,
        router=router,
        vision=vision,
        projector=projector,
        split=split,
        force=force,
    )
    return [os.fspath(p) for p in paths]


def pope_score(
    annotation_dir: Union[str, "os.PathLike[str]"],
    question_file: Union[str, "os.PathLike[str]"],
    result_file: Union[str, "os.PathLike[str]"],
) -> Dict[str, Any]:
    """Scores POPE answers with the official rules; the same dict `moellava pope score --json` prints."""
    return json.loads(
        _moellava.pope_score_json(os.fspath(annotation_dir), os.fspath(question_file), os.fspath(result_file))
    )
