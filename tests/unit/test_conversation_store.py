"""Conversation storage, on both backends: SQLite (a file) and PostgreSQL (a real server).

Every test runs once per backend. The PostgreSQL server is started once for
the session by `tests/postgres_server.py` (Debian's `postgresql` package);
each test gets a fresh database on it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from app.config import ConfigError, load_settings
from app.generate.store import (
    SQLITE_FILE_NAME,
    ConversationStore,
    ConversationStoreError,
    PostgresConversationStore,
    SQLiteConversationStore,
    build_store,
)
from tests.postgres_server import PostgresServer, running_postgres

TTL_S = 60.0

StoreFactory = Callable[..., ConversationStore]


class FakeClock:
    """Wall clock the tests move by hand, so TTL tests need no sleeping."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    with running_postgres() as server:
        yield server


@pytest_asyncio.fixture(params=["sqlite", "postgres"])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """Returns a factory of not-yet-started stores that all share one database."""
    if request.param == "sqlite":
        path = tmp_path / SQLITE_FILE_NAME
        yield lambda **options: SQLiteConversationStore(path, **{"ttl_s": TTL_S, **options})
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    database = f"test_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(server.dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
        yield lambda **options: PostgresConversationStore(server.dsn_for(database), **{"ttl_s": TTL_S, **options})
        await admin.execute(f'DROP DATABASE "{database}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest_asyncio.fixture
async def store(make_store: StoreFactory, clock: FakeClock) -> AsyncIterator[ConversationStore]:
    started = make_store(clock=clock)
    await started.start()
    yield started
    await started.close()


@pytest.mark.asyncio
async def test_exchange_is_stored_in_order_with_system_prompt(store: ConversationStore) -> None:
    assert await store.append_exchange("c1", "Be brief.", "Hi", "Hello!", create=True)
    assert await store.append_exchange("c1", None, "Capital of France?", "Paris.", create=False)

    conversation = await store.get("c1")
    assert conversation is not None
    assert conversation.system == "Be brief."
    assert [(t.role, t.content) for t in conversation.turns] == [
        ("user", "Hi"),
        ("assistant", "Hello!"),
        ("user", "Capital of France?"),
        ("assistant", "Paris."),
    ]
    [summary] = await store.list_recent(10)
    assert (summary.id, summary.turn_count) == ("c1", 4)


@pytest.mark.asyncio
async def test_new_system_prompt_replaces_the_stored_one(store: ConversationStore) -> None:
    await store.append_exchange("c1", "Be brief.", "a", "b", create=True)
    await store.append_exchange("c1", "Answer in French.", "c", "d", create=False)
    conversation = await store.get("c1")
    assert conversation is not None and conversation.system == "Answer in French."


@pytest.mark.asyncio
async def test_append_to_unknown_conversation_without_create_stores_nothing(store: ConversationStore) -> None:
    assert not await store.append_exchange("missing", None, "a", "b", create=False)
    assert await store.get("missing") is None
    assert await store.list_recent(10) == []


@pytest.mark.asyncio
async def test_conversations_survive_a_restart(make_store: StoreFactory, clock: FakeClock) -> None:
    first = make_store(clock=clock)
    await first.start()
    await first.append_exchange("kept", None, "remember 42", "noted", create=True)
    await first.close()

    reopened = make_store(clock=clock)
    await reopened.start()
    try:
        conversation = await reopened.get("kept")
        assert conversation is not None
        assert [t.content for t in conversation.turns] == ["remember 42", "noted"]
    finally:
        await reopened.close()


@pytest.mark.asyncio
async def test_list_is_newest_first_and_limited(store: ConversationStore, clock: FakeClock) -> None:
    for name in ("old", "middle", "new"):
        await store.append_exchange(name, None, "q", "a", create=True)
        clock.now += 1
    assert [s.id for s in await store.list_recent(10)] == ["new", "middle", "old"]
    assert [s.id for s in await store.list_recent(2)] == ["new", "middle"]


@pytest.mark.asyncio
async def test_idle_conversations_expire_and_are_deleted_on_lookup(
    make_store: StoreFactory, store: ConversationStore, clock: FakeClock
) -> None:
    await store.append_exchange("idle", None, "q", "a", create=True)
    clock.now += TTL_S / 2
    await store.append_exchange("active", None, "q", "a", create=True)
    clock.now += TTL_S / 2 + 1  # "idle" is now past the TTL, "active" is not

    assert [s.id for s in await store.list_recent(10)] == ["active"]
    assert await store.get("idle") is None
    assert await store.get("active") is not None

    # The lookup deleted the row: a store without a practical TTL no longer finds it.
    forever = make_store(ttl_s=1e12)
    await forever.start()
    try:
        assert await forever.get("idle") is None
        assert await forever.get("active") is not None
    finally:
        await forever.close()


@pytest.mark.asyncio
async def test_periodic_purge_deletes_expired_conversations(make_store: StoreFactory, clock: FakeClock) -> None:
    purging = make_store(clock=clock, purge_interval_s=0.05)
    forever = make_store(ttl_s=1e12)
    await purging.start()
    await forever.start()
    try:
        await purging.append_exchange("stale", None, "q", "a", create=True)
        clock.now += TTL_S + 1
        for _ in range(100):
            if await forever.get("stale") is None:
                break
            await asyncio.sleep(0.05)
        assert await forever.get("stale") is None
    finally:
        await purging.close()
        await forever.close()


@pytest.mark.asyncio
async def test_delete_removes_conversation_and_turns(store: ConversationStore) -> None:
    await store.append_exchange("gone", None, "q", "a", create=True)
    assert await store.delete("gone")
    assert await store.get("gone") is None
    assert not await store.delete("gone")
    # The same id starts afresh, without the deleted turns.
    await store.append_exchange("gone", None, "new q", "new a", create=True)
    conversation = await store.get("gone")
    assert conversation is not None
    assert [t.content for t in conversation.turns] == ["new q", "new a"]


@pytest.mark.asyncio
async def test_concurrent_exchanges_from_two_processes_keep_every_turn(
    make_store: StoreFactory, clock: FakeClock
) -> None:
    # Two stores on one database stand for two wrapper workers; each sends 10 exchanges at once.
    workers = [make_store(clock=clock), make_store(clock=clock)]
    for worker in workers:
        await worker.start()
    try:
        await asyncio.gather(*(
            workers[i % 2].append_exchange("busy", None, f"question {i}", f"answer {i}", create=True)
            for i in range(20)
        ))
        conversation = await workers[0].get("busy")
    finally:
        for worker in workers:
            await worker.close()

    assert conversation is not None
    turns = conversation.turns
    assert len(turns) == 40
    questions = sorted(int(t.content.split()[1]) for t in turns[0::2])
    assert questions == list(range(20))
    for user, assistant in zip(turns[0::2], turns[1::2], strict=True):
        assert user.role == "user" and assistant.role == "assistant"
        assert assistant.content == user.content.replace("question", "answer")


@pytest.mark.asyncio
async def test_unreachable_postgres_fails_with_store_error() -> None:
    # Port 8651 is in this suite's range and nothing listens on it.
    store = PostgresConversationStore("postgresql://postgres@127.0.0.1:8651/postgres", ttl_s=TTL_S)
    with pytest.raises(ConversationStoreError, match="PostgreSQL conversation store failed"):
        await store.start()


def test_build_store_follows_the_settings(tmp_path: Path) -> None:
    assert build_store(load_settings({"CONVERSATIONS_ENABLED": "false"})) is None

    sqlite = build_store(load_settings({"HF_HOME": str(tmp_path), "CONVERSATIONS_TTL_S": "30"}))
    assert isinstance(sqlite, SQLiteConversationStore)
    assert sqlite.path == tmp_path / SQLITE_FILE_NAME
    assert sqlite.ttl_s == 30

    postgres = build_store(load_settings({"CONVERSATIONS_DB_URL": "postgresql://u:pw@db:5432/app"}))
    assert isinstance(postgres, PostgresConversationStore)

    with pytest.raises(ConfigError, match="CONVERSATIONS_DB_URL") as refused:
        build_store(load_settings({"CONVERSATIONS_DB_URL": "mysql://u:s3cret@db/app"}))
    assert "s3cret" not in str(refused.value)
