"""RAG frameworks' Qdrant integrations, unchanged, against a real `qinco serve`: LangChain
(langchain-qdrant), LlamaIndex (llama-index-vector-stores-qdrant) and Haystack (qdrant-haystack).

Each framework creates its collection itself (by size and distance: a self-training collection,
searched exactly until it has a model) and is used as its documentation shows. Embeddings are
deterministic word hashes (no model download): the same text always gives the same vector, so a
stored text searched for comes back first with a cosine of 1.

Nothing may leave the machine: the frameworks are imported, and every test runs, with a guard
that lets sockets reach loopback addresses only and records any other attempt (a DNS look-up
included); a test fails if its framework tried.
"""

import asyncio
import contextlib
import hashlib
import importlib
import ipaddress
import os
import re
import socket
import sys
import uuid

import pytest

from tests.server import free_port, serve

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")  # Haystack's opt-out of its usage statistics
os.environ["LANGCHAIN_TRACING_V2"] = os.environ["LANGSMITH_TRACING"] = "false"  # LangSmith stays off


def _loopback(host) -> bool:
    if isinstance(host, bytes):
        host = host.decode()
    if host is None or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def network_guard():
    """Sockets reach loopback addresses only; every other connection or name look-up raises
    OSError and is recorded in the list this yields."""
    attempts = []
    real = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def check(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            attempts.append(address)
            raise OSError(f"test_frameworks: network access blocked ({address})")

    def connect(sock, address):
        check(sock, address)
        return real[0](sock, address)

    def connect_ex(sock, address):
        check(sock, address)
        return real[1](sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _loopback(host):
            attempts.append(host)
            raise socket.gaierror(socket.EAI_NONAME, f"test_frameworks: name look-up blocked ({host})")
        return real[2](host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
    try:
        yield attempts
    finally:
        socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = real


FRAMEWORKS = ("langchain_qdrant", "llama_index.core", "llama_index.vector_stores.qdrant",
              "haystack_integrations.document_stores.qdrant")
FRESH_IMPORT = not any(name in sys.modules for name in FRAMEWORKS)
with network_guard() as IMPORT_ATTEMPTS:
    import langchain_qdrant  # the dev extra installs every framework: a missing one fails, never skips
    from langchain_core.embeddings import Embeddings
    from llama_index.core import Document as LlamaDocument
    from llama_index.core import StorageContext, VectorStoreIndex
    from llama_index.core.embeddings import BaseEmbedding
    from llama_index.core.vector_stores import FilterCondition, FilterOperator, MetadataFilter, MetadataFilters
    from llama_index.vector_stores.qdrant import QdrantVectorStore as LlamaQdrantVectorStore
    from qdrant_client import AsyncQdrantClient, QdrantClient, models
    from haystack import Document as HaystackDocument
    from haystack.document_stores.errors import DuplicateDocumentError
    from haystack.document_stores.types import DuplicatePolicy
    from haystack_integrations.components.retrievers.qdrant import QdrantEmbeddingRetriever
    from haystack_integrations.document_stores.qdrant import QdrantDocumentStore
    # What LlamaIndex loads on first use (its default tokenizer, whose BPE file ships in llama-index-core,
    # and sentence splitter), so that the import check sees those imports too.
    for lazy in ("tiktoken", "nltk", "llama_index.core.node_parser"):
        importlib.import_module(lazy)
IMPORT_ATTEMPTS = list(IMPORT_ATTEMPTS)


@pytest.fixture(autouse=True)
def no_network():
    with network_guard() as attempts:
        yield
    assert not attempts, f"a framework tried to reach the network: {attempts}"


def test_network_guard_lets_only_loopback_through(monkeypatch):
    """The guard itself, over stand-ins for the socket calls (so that nothing can leave even if it failed)."""
    reached = []
    monkeypatch.setattr(socket.socket, "connect", lambda sock, address: reached.append(address))
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: reached.append(host) or [])
    with network_guard() as attempts, socket.socket() as s, socket.socket(socket.AF_INET6) as s6:
        s.connect(("127.0.0.1", 9))
        s6.connect(("::1", 9, 0, 0))
        socket.getaddrinfo("localhost", 9)
        for call in (lambda: s.connect(("192.0.2.1", 9)), lambda: s6.connect(("2001:db8::1", 9, 0, 0)),
                     lambda: socket.getaddrinfo("example.com", 443)):
            with pytest.raises(OSError):
                call()
    assert reached == [("127.0.0.1", 9), ("::1", 9, 0, 0), "localhost"]
    assert attempts == [("192.0.2.1", 9), ("2001:db8::1", 9, 0, 0), "example.com"]


def test_frameworks_import_without_network():
    assert FRESH_IMPORT, "the frameworks were imported before this module: the import check proves nothing"
    assert not IMPORT_ATTEMPTS, f"importing a framework tried to reach the network: {IMPORT_ATTEMPTS}"


# --- deterministic embeddings --------------------------------------------------------------------

DIM = 32


def embed(text: str) -> list[float]:
    """Each word adds +-1 to two of DIM components chosen by its SHA-256 (feature hashing); unit norm."""
    v = [0.0] * DIM
    for word in re.findall(r"\w+", text.lower()):
        for k in (0, 1):
            h = hashlib.sha256(f"{k}:{word}".encode()).digest()
            v[int.from_bytes(h[:4], "little") % DIM] += 1.0 if h[4] & 1 else -1.0
    norm = sum(x * x for x in v) ** 0.5
    return [x / norm for x in v] if norm else [1.0] + [0.0] * (DIM - 1)


class HashEmbeddings(Embeddings):
    """LangChain's embedding interface over embed()."""

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [embed(t) for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return embed(text)


class HashEmbedding(BaseEmbedding):
    """LlamaIndex's embedding interface over embed()."""

    def _get_text_embedding(self, text: str) -> list[float]:
        return embed(text)

    def _get_query_embedding(self, query: str) -> list[float]:
        return embed(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return embed(query)


TEXTS = [
    "the cat sat on the warm mat",
    "the cat sat on the warm mat all afternoon",  # a near duplicate of the first
    "dogs chase squirrels around the park",
    "an owl hunts mice at night",
    "residual quantization with neural codebooks",
    "vector search engines index embeddings",
    "the compiler rejected my template code",
    "paris is the capital of france",
    "the river flows through the old town",
    "mountains surround the quiet lake",
]
TOPICS = ["animals"] * 4 + ["tech"] * 3 + ["places"] * 3
METADATA = [{"topic": topic, "n": i} for i, topic in enumerate(TOPICS)]
PLACES = {t for t, topic in zip(TEXTS, TOPICS) if topic == "places"}


def test_embeddings_tell_every_text_apart():
    """The premise of the tests below: each text is its own nearest neighbour, by a margin."""
    for i, text in enumerate(TEXTS):
        sims = sorted((sum(a * b for a, b in zip(embed(text), embed(other))), j) for j, other in enumerate(TEXTS))
        assert sims[-1][1] == i and sims[-1][0] > 0.999 and sims[-2][0] < 0.97


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    """A real `qinco serve` with no collection: each test's framework creates its own."""
    port = free_port()
    proc = serve(tmp_path_factory.mktemp("frameworks"), port, "--no-demo")
    yield f"http://127.0.0.1:{port}"
    proc.kill()
    proc.wait()


def same_id(a, b) -> bool:
    """Point ids as Qdrant answers them: a UUID in its canonical form, whatever form it was sent in."""
    return a == b if isinstance(a, int) or isinstance(b, int) else uuid.UUID(str(a)) == uuid.UUID(str(b))


# --- LangChain ------------------------------------------------------------------------------------

def langchain_store(url: str, name: str, texts=TEXTS, metadatas=METADATA):
    return langchain_qdrant.QdrantVectorStore.from_texts(texts, HashEmbeddings(), metadatas=metadatas, url=url,
                                                         collection_name=name)


def test_langchain_from_texts_search_and_retriever(url):
    store = langchain_store(url, "lc-search")
    for i, text in enumerate(TEXTS):
        docs = store.similarity_search(text, k=3)
        assert len(docs) == 3 and docs[0].page_content == text
        assert {k: docs[0].metadata[k] for k in ("topic", "n")} == METADATA[i]
        assert docs[0].metadata["_collection_name"] == "lc-search"

    hits = store.similarity_search_with_score(TEXTS[0], k=4)
    assert [doc.page_content for doc, _ in hits[:2]] == TEXTS[:2]  # the text, then its near duplicate
    assert hits[0][1] == pytest.approx(1.0, abs=1e-3) and hits[1][1] == pytest.approx(0.964, abs=0.01)
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True) and hits[-1][1] < 0.9

    again = langchain_qdrant.QdrantVectorStore.from_existing_collection("lc-search", HashEmbeddings(), url=url)
    assert again.similarity_search(TEXTS[4], k=1)[0].page_content == TEXTS[4]
    assert again.client.count("lc-search").count == len(TEXTS)

    found = store.as_retriever(search_kwargs={"k": 2}).invoke(TEXTS[7])
    assert len(found) == 2 and found[0].page_content == TEXTS[7] and found[0].metadata["topic"] == "places"


def test_langchain_metadata_filter(url):
    store = langchain_store(url, "lc-filter")
    places = models.Filter(must=[models.FieldCondition(key="metadata.topic", match=models.MatchValue(value="places"))])
    docs = store.similarity_search(TEXTS[0], k=5, filter=places)
    assert {d.page_content for d in docs} == PLACES and TEXTS[0] not in {d.page_content for d in docs}
    late = models.Filter(must=[models.FieldCondition(key="metadata.topic", match=models.MatchValue(value="places")),
                               models.FieldCondition(key="metadata.n", range=models.Range(gte=8))])
    hits = store.similarity_search_with_score(TEXTS[7], k=5, filter=late)
    assert sorted(d.metadata["n"] for d, _ in hits) == [8, 9]
    assert [d.page_content for d in store.similarity_search(TEXTS[8], k=1, filter=late)] == [TEXTS[8]]


def test_langchain_add_texts_get_by_ids_and_delete(url):
    store = langchain_store(url, "lc-crud", TEXTS[:3], METADATA[:3])
    new = ["a lighthouse keeper counts the waves", "bread rises slowly in a cold kitchen"]
    ids = store.add_texts(new, metadatas=[{"topic": "new", "n": 10}, {"topic": "new", "n": 11}])
    assert len(ids) == 2
    assert store.add_texts(["an integer id is fine too"], ids=[42]) == [42]
    got = store.get_by_ids([ids[1], 42, ids[0]])
    assert {d.page_content for d in got} == {*new, "an integer id is fine too"}
    by_text = {d.page_content: d.metadata for d in got}
    assert same_id(by_text[new[0]]["_id"], ids[0]) and by_text[new[1]]["n"] == 11
    assert store.similarity_search(new[0], k=1)[0].page_content == new[0]

    assert store.delete(ids) is True
    assert store.get_by_ids(ids) == []
    remaining = [d.page_content for d in store.similarity_search(new[0], k=10)]
    assert sorted(remaining) == sorted([*TEXTS[:3], "an integer id is fine too"])
    assert store.client.count("lc-crud").count == 4


def test_langchain_max_marginal_relevance(url):
    store = langchain_store(url, "lc-mmr")
    query = "cat sat on the mat"
    assert [d.page_content for d in store.similarity_search(query, k=2)] == TEXTS[:2]
    # Qdrant's own MMR (query `nearest` with `mmr`): the best match first, then not its near duplicate.
    # lambda_mult = 0.5 picks the same second text whichever way it maps onto Qdrant's `diversity`.
    docs = store.max_marginal_relevance_search(query, k=2, fetch_k=10, lambda_mult=0.5)
    assert len(docs) == 2 and docs[0].page_content == TEXTS[0] and docs[1].page_content not in TEXTS[:2]


# --- LlamaIndex -----------------------------------------------------------------------------------

def llama_documents() -> list:
    # The metadata is kept out of the embedded text, so that a node's vector is its text's.
    return [LlamaDocument(text=t, id_=f"doc-{i}", metadata=m, excluded_embed_metadata_keys=["topic", "n"])
            for i, (t, m) in enumerate(zip(TEXTS, METADATA))]


PLACES_FROM_8 = MetadataFilters(filters=[MetadataFilter(key="topic", value="places"),
                                         MetadataFilter(key="n", value=8, operator=FilterOperator.GTE)],
                                condition=FilterCondition.AND)


def test_llamaindex_build_retrieve_filter_delete(url):
    client = QdrantClient(url=url)
    store = LlamaQdrantVectorStore(client=client, collection_name="li")
    index = VectorStoreIndex.from_documents(llama_documents(), storage_context=StorageContext.from_defaults(
        vector_store=store), embed_model=HashEmbedding())
    assert client.count("li").count == len(TEXTS)

    retriever = index.as_retriever(similarity_top_k=3)
    for i, text in enumerate(TEXTS):
        hits = retriever.retrieve(text)
        assert len(hits) == 3 and hits[0].node.get_content() == text
        assert hits[0].score == pytest.approx(1.0, abs=1e-3) and hits[1].score < 0.97
        assert hits[0].node.ref_doc_id == f"doc-{i}" and hits[0].node.metadata == METADATA[i]

    places = MetadataFilters(filters=[MetadataFilter(key="topic", value="places")])
    hits = index.as_retriever(similarity_top_k=5, filters=places).retrieve(TEXTS[0])
    assert {h.node.get_content() for h in hits} == PLACES
    hits = index.as_retriever(similarity_top_k=5, filters=PLACES_FROM_8).retrieve(TEXTS[7])
    assert sorted(h.node.metadata["n"] for h in hits) == [8, 9]

    index.delete_ref_doc("doc-0")
    texts = [h.node.get_content() for h in index.as_retriever(similarity_top_k=10).retrieve(TEXTS[0])]
    assert TEXTS[0] not in texts and texts[0] == TEXTS[1] and len(texts) == len(TEXTS) - 1
    assert client.count("li").count == len(TEXTS) - 1


def test_llamaindex_async_client(url):
    """The whole life of an index through AsyncQdrantClient alone: create, insert, retrieve, filter, delete."""

    async def main():
        aclient = AsyncQdrantClient(url=url)
        try:
            store = LlamaQdrantVectorStore(aclient=aclient, collection_name="li-async")
            index = VectorStoreIndex.from_vector_store(store, embed_model=HashEmbedding())
            for doc in llama_documents():
                await index.ainsert(doc)
            assert (await aclient.count("li-async")).count == len(TEXTS)

            hits = await index.as_retriever(similarity_top_k=2).aretrieve(TEXTS[5])
            assert [h.node.get_content() for h in hits][:1] == [TEXTS[5]] and len(hits) == 2
            assert hits[0].score == pytest.approx(1.0, abs=1e-3) and hits[0].node.ref_doc_id == "doc-5"
            hits = await index.as_retriever(similarity_top_k=5, filters=PLACES_FROM_8).aretrieve(TEXTS[5])
            assert sorted(h.node.metadata["n"] for h in hits) == [8, 9]

            await index.adelete_ref_doc("doc-5")
            hits = await index.as_retriever(similarity_top_k=10).aretrieve(TEXTS[5])
            assert TEXTS[5] not in [h.node.get_content() for h in hits] and len(hits) == len(TEXTS) - 1
        finally:
            await aclient.close()

    asyncio.run(main())


# --- Haystack -------------------------------------------------------------------------------------

def test_haystack_document_store(url):
    store = QdrantDocumentStore(url=url, index="hs", embedding_dim=DIM, similarity="cosine", progress_bar=False)
    docs = [HaystackDocument(content=t, meta=m, embedding=embed(t)) for t, m in zip(TEXTS, METADATA)]
    assert store.write_documents(docs) == len(TEXTS)
    assert store.count_documents() == len(TEXTS)
    with pytest.raises(DuplicateDocumentError):
        store.write_documents(docs[:2])
    assert store.write_documents(docs[:2], policy=DuplicatePolicy.SKIP) == 0
    assert store.write_documents(docs[:2], policy=DuplicatePolicy.OVERWRITE) == 2
    assert store.count_documents() == len(TEXTS)

    places = {"field": "meta.topic", "operator": "==", "value": "places"}
    assert {d.content for d in store.filter_documents(places)} == PLACES
    late = {"operator": "AND", "conditions": [places, {"field": "meta.n", "operator": ">=", "value": 8}]}
    found = store.filter_documents(late)
    assert sorted(d.meta["n"] for d in found) == [8, 9]
    assert all(d.embedding == pytest.approx(embed(d.content), abs=1e-3) for d in found)  # stored vectors come back
    assert [d.content for d in store.get_documents_by_id([docs[3].id])] == [TEXTS[3]]

    retriever = QdrantEmbeddingRetriever(document_store=store, top_k=3)
    for text in TEXTS:
        out = retriever.run(query_embedding=embed(text))["documents"]
        assert len(out) == 3 and out[0].content == text and out[0].score == pytest.approx(1.0, abs=1e-3)
    out = retriever.run(query_embedding=embed(TEXTS[0]), filters=places, top_k=5)["documents"]
    assert {d.content for d in out} == PLACES

    store.delete_documents([docs[2].id])
    assert store.count_documents() == len(TEXTS) - 1
    out = retriever.run(query_embedding=embed(TEXTS[2]), top_k=10)["documents"]
    assert TEXTS[2] not in [d.content for d in out] and len(out) == len(TEXTS) - 1
