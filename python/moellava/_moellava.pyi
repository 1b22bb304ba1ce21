"""Type stubs of the native module (the public API is in moellava/__init__.py)."""

from typing import Iterator, List, Optional, Tuple

__version__: str

class Error(Exception): ...
class FormatError(Error): ...
class ModelError(Error): ...
class ImageError(Error): ...

class NativeStream(Iterator[str]):
    def __iter__(self) -> "NativeStream": ...
    def __next__(self) -> str: ...
    def answer_json(self) -> Optional[str]: ...
    def cancel(self) -> None: ...

class NativeModel:
    def __init__(
        self,
        path: str,
        threads: Optional[int] = None,
        kv_cache: Optional[str] = None,
        expert_ram: Optional[str] = None,
        expert_policy: str = "lru",
        prefetch: bool = False,
    ) -> None: ...
    def info_json(self) -> str: ...
    def stream(
        self,
        prompt: str,
        image_path: Optional[str] = None,
        image_bytes: Optional[bytes] = None,
        image_rgb: Optional[Tuple[int, int, bytes]] = None,
        raw_prompt: bool = False,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: int = 0,
        ignore_eos: bool = False,
    ) -> NativeStream: ...
    def logits_bytes(
        self,
        prompt: str,
        image_path: Optional[str] = None,
        image_bytes: Optional[bytes] = None,
        image_rgb: Optional[Tuple[int, int, bytes]] = None,
        raw_prompt: bool = False,
    ) -> bytes: ...
    def expert_cache_json(self) -> str: ...

def convert(
    hf_dir: str,
    output: str,
    *,
    vision_tower: Optional[str] = None,
    preset: Optional[str] = None,
    all: Optional[str] = None,
    experts: Optional[str] = None,
    dense: Optional[str] = None,
    embeddings: Optional[str] = None,
    router: Optional[str] = None,
    vision: Optional[str] = None,
    projector: Optional[str] = None,
    split: bool = False,
    force: bool = False,
) -> List[str]: ...
def pope_score_json(annotation_dir: str, question_file: str, result_file: str) -> str: ...
