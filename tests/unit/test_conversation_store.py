"""Conversation storage, on both backends: SQLite (a file) and PostgreSQL (a real server).

Most tests run once per backend. The PostgreSQL server is started once for the
session by `tests/postgres_server.py` (Debian's `postgresql` package); each
test gets a fresh database on it. Tests that stop a server start their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Self, TypeVar

import asyncpg
import pytest
import pytest_asyncio

from app.config import RUNPOD_VOLUME, ConfigError, load_settings
from app.generate.store import (
    SQLITE_FILE_NAME,
    UNKNOWN_OWNER,
    ConversationStore,
    ConversationStoreError,
    PostgresConversationStore,
    SQLiteConversationStore,
    build_store,
    owner_of,
    sqlite_path,
)
from tests.postgres_server import PostgresServer, free_port, running_postgres

TTL_S = 60.0
# Long enough that a busy 2-core machine never trips it where no timeout is under test.
TIMEOUT_S = 30.0
# Where a timeout is under test: short, so the tests are quick.
SHORT_TIMEOUT_S = 0.5
# Only catches a hang (the bound under test is SHORT_TIMEOUT_S): a failure here means "hangs", not "slow".
HANG_GUARD_S = 120.0
# Generous deadline for an event to happen (a server to start, a store to reconnect).
EVENT_DEADLINE_S = 120.0
SETTING = "CONVERSATIONS_DB_TIMEOUT_S"

ALICE = owner_of("alice-key")
BOB = owner_of("bob-key")
NO_KEY = owner_of(None)

# The schema before conversations had owners, as databases on volumes still hold it.
OLD_SQLITE_SCHEMA = """
CREATE TABLE conversations (
    id TEXT PRIMARY KEY, system TEXT, created REAL NOT NULL, updated REAL NOT NULL,
    turn_count INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX conversations_updated ON conversations (updated);
CREATE TABLE conversation_turns (
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL, role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (conversation_id, seq)
);
"""
OLD_POSTGRES_SCHEMA = OLD_SQLITE_SCHEMA.replace("REAL", "DOUBLE PRECISION")

StoreFactory = Callable[..., ConversationStore]
T = TypeVar("T")


class FakeClock:
    """Wall clock the tests move by hand, so TTL tests need no sleeping."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Database:
    """One database of a test, for the store under test and for raw SQL (old schemas, locks)."""

    def __init__(self, backend: str, target: str) -> None:
        self.backend = backend
        self.target = target  # the SQLite file, or the PostgreSQL DSN

    def store(self, **options: Any) -> ConversationStore:
        options = {"ttl_s": TTL_S, "timeout_s": TIMEOUT_S, **options}
        if self.backend == "sqlite":
            return SQLiteConversationStore(Path(self.target), **options)
        return PostgresConversationStore(self.target, **options)

    async def execute(self, script: str, *rows: tuple[Any, ...]) -> None:
        """Run a script, then insert each row as (table, values...)."""
        if self.backend == "sqlite":
            with contextlib.closing(sqlite3.connect(self.target)) as db, db:
                db.executescript(script)
                for table, *values in rows:
                    db.execute(f"INSERT INTO {table} VALUES ({', '.join('?' * len(values))})", values)
            return
        conn = await asyncpg.connect(self.target)
        try:
            if script:
                await conn.execute(script)
            for table, *values in rows:
                await conn.execute(
                    f"INSERT INTO {table} VALUES ({', '.join(f'${i + 1}' for i in range(len(values)))})", *values
                )
        finally:
            await conn.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    # A free port rather than a fixed one: another checkout's test run may have a server up.
    with running_postgres(free_port()) as server:
        yield server


@pytest_asyncio.fixture(params=["sqlite", "postgres"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        yield Database("sqlite", str(tmp_path / SQLITE_FILE_NAME))
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = f"test_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(server.dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield Database("postgres", server.dsn_for(name))
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
def make_store(database: Database) -> StoreFactory:
    """A factory of not-yet-started stores that all share one database."""
    return database.store


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest_asyncio.fixture
async def store(make_store: StoreFactory, clock: FakeClock) -> AsyncIterator[ConversationStore]:
    started = make_store(clock=clock)
    await started.start()
    yield started
    await started.close()


async def eventually(attempt: Callable[[], Awaitable[T]], what: str) -> T:
    """The first true result of `attempt()`; store errors along the way are expected (the database is coming back)."""
    deadline = time.monotonic() + EVENT_DEADLINE_S
    while time.monotonic() < deadline:
        try:
            if result := await attempt():
                return result
        except ConversationStoreError:
            pass
        await asyncio.sleep(0.1)
    pytest.fail(f"{what} did not happen within {EVENT_DEADLINE_S:g}s")


def contents(conversation: Any) -> list[str]:
    assert conversation is not None
    return [turn.content for turn in conversation.turns]


def store_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "app.generate.store" and r.levelno == logging.WARNING]


# --- Conversations ---------------------------------------------------------------------------------------


async def test_exchange_is_stored_in_order_with_system_prompt(store: ConversationStore) -> None:
    assert await store.append_exchange("c1", "Be brief.", "Hi", "Hello!", owner=ALICE, create=True)
    assert await store.append_exchange("c1", None, "Capital of France?", "Paris.", owner=ALICE, create=False)

    conversation = await store.get("c1", owner=ALICE)
    assert conversation is not None
    assert conversation.system == "Be brief."
    assert [(t.role, t.content) for t in conversation.turns] == [
        ("user", "Hi"),
        ("assistant", "Hello!"),
        ("user", "Capital of France?"),
        ("assistant", "Paris."),
    ]
    [summary] = await store.list_recent(10, owner=ALICE)
    assert (summary.id, summary.turn_count) == ("c1", 4)


async def test_new_system_prompt_replaces_the_stored_one(store: ConversationStore) -> None:
    await store.append_exchange("c1", "Be brief.", "a", "b", owner=ALICE, create=True)
    await store.append_exchange("c1", "Answer in French.", "c", "d", owner=ALICE, create=False)
    conversation = await store.get("c1", owner=ALICE)
    assert conversation is not None and conversation.system == "Answer in French."


async def test_append_to_unknown_conversation_without_create_stores_nothing(store: ConversationStore) -> None:
    assert not await store.append_exchange("missing", None, "a", "b", owner=ALICE, create=False)
    assert await store.get("missing", owner=ALICE) is None
    assert await store.list_recent(10, owner=ALICE) == []


async def test_conversations_survive_a_restart(make_store: StoreFactory, clock: FakeClock) -> None:
    first = make_store(clock=clock)
    await first.start()
    await first.append_exchange("kept", None, "remember 42", "noted", owner=ALICE, create=True)
    await first.close()

    reopened = make_store(clock=clock)
    await reopened.start()
    try:
        assert contents(await reopened.get("kept", owner=ALICE)) == ["remember 42", "noted"]
    finally:
        await reopened.close()


async def test_list_is_newest_first_and_limited(store: ConversationStore, clock: FakeClock) -> None:
    for name in ("old", "middle", "new"):
        await store.append_exchange(name, None, "q", "a", owner=ALICE, create=True)
        clock.now += 1
    assert [s.id for s in await store.list_recent(10, owner=ALICE)] == ["new", "middle", "old"]
    assert [s.id for s in await store.list_recent(2, owner=ALICE)] == ["new", "middle"]


async def test_idle_conversations_expire_and_are_deleted_on_lookup(
    make_store: StoreFactory, store: ConversationStore, clock: FakeClock
) -> None:
    await store.append_exchange("idle", None, "q", "a", owner=ALICE, create=True)
    clock.now += TTL_S / 2
    await store.append_exchange("active", None, "q", "a", owner=ALICE, create=True)
    clock.now += TTL_S / 2 + 1  # "idle" is now past the TTL, "active" is not

    assert [s.id for s in await store.list_recent(10, owner=ALICE)] == ["active"]
    assert await store.get("idle", owner=ALICE) is None
    assert await store.get("active", owner=ALICE) is not None

    # The lookup deleted the row: a store without a practical TTL no longer finds it.
    forever = make_store(ttl_s=1e12)
    await forever.start()
    try:
        assert await forever.get("idle", owner=ALICE) is None
        assert await forever.get("active", owner=ALICE) is not None
    finally:
        await forever.close()


async def test_periodic_purge_deletes_expired_conversations(make_store: StoreFactory, clock: FakeClock) -> None:
    purging = make_store(clock=clock, purge_interval_s=0.05)
    forever = make_store(ttl_s=1e12)
    await purging.start()
    await forever.start()
    try:
        await purging.append_exchange("stale", None, "q", "a", owner=ALICE, create=True)
        clock.now += TTL_S + 1

        async def purged() -> bool:
            return await forever.get("stale", owner=ALICE) is None

        assert await eventually(purged, "the periodic purge")
    finally:
        await purging.close()
        await forever.close()


async def test_delete_removes_conversation_and_turns(store: ConversationStore) -> None:
    await store.append_exchange("gone", None, "q", "a", owner=ALICE, create=True)
    assert await store.delete("gone", owner=ALICE)
    assert await store.get("gone", owner=ALICE) is None
    assert not await store.delete("gone", owner=ALICE)
    # The same id starts afresh, without the deleted turns.
    await store.append_exchange("gone", None, "new q", "new a", owner=ALICE, create=True)
    assert contents(await store.get("gone", owner=ALICE)) == ["new q", "new a"]


async def test_concurrent_exchanges_from_two_processes_keep_every_turn(
    make_store: StoreFactory, clock: FakeClock
) -> None:
    # Two stores on one database stand for two wrapper workers; each sends 10 exchanges at once.
    workers = [make_store(clock=clock), make_store(clock=clock)]
    for worker in workers:
        await worker.start()
    try:
        await asyncio.gather(*(
            workers[i % 2].append_exchange("busy", None, f"question {i}", f"answer {i}", owner=ALICE, create=True)
            for i in range(20)
        ))
        conversation = await workers[0].get("busy", owner=ALICE)
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


# --- Owners ----------------------------------------------------------------------------------------------


def test_owner_is_a_hash_of_the_key_and_empty_without_one() -> None:
    assert owner_of(None) == ""
    assert owner_of("alice-key") == owner_of(b"alice-key"), "the key as str or as presented bytes"
    assert owner_of("alice-key") != owner_of("bob-key")
    assert len(ALICE) == 64 and set(ALICE) <= set("0123456789abcdef")
    assert UNKNOWN_OWNER not in {NO_KEY, ALICE, BOB}


async def test_another_owners_conversation_looks_missing(store: ConversationStore) -> None:
    assert await store.append_exchange("mine", "Be brief.", "secret question", "secret answer", owner=ALICE, create=True)

    for stranger in (BOB, NO_KEY):
        assert await store.get("mine", owner=stranger) is None
        assert await store.list_recent(10, owner=stranger) == []
        assert not await store.append_exchange("mine", "Say it all.", "q", "a", owner=stranger, create=False)
        assert not await store.append_exchange("mine", "Say it all.", "q", "a", owner=stranger, create=True)
        assert not await store.delete("mine", owner=stranger)

    conversation = await store.get("mine", owner=ALICE)
    assert conversation is not None and conversation.system == "Be brief."
    assert contents(conversation) == ["secret question", "secret answer"]
    assert [s.id for s in await store.list_recent(10, owner=ALICE)] == ["mine"]
    assert await store.delete("mine", owner=ALICE)


async def test_each_owner_lists_only_their_own(store: ConversationStore, clock: FakeClock) -> None:
    for owner, name in ((ALICE, "a1"), (BOB, "b1"), (ALICE, "a2"), (NO_KEY, "n1")):
        await store.append_exchange(name, None, "q", "a", owner=owner, create=True)
        clock.now += 1
    assert [s.id for s in await store.list_recent(10, owner=ALICE)] == ["a2", "a1"]
    assert [s.id for s in await store.list_recent(10, owner=BOB)] == ["b1"]
    assert [s.id for s in await store.list_recent(10, owner=NO_KEY)] == ["n1"]


# --- Migration from the schema without owners ------------------------------------------------------------


async def write_old_database(database: Database, updated: float) -> None:
    schema = OLD_SQLITE_SCHEMA if database.backend == "sqlite" else OLD_POSTGRES_SCHEMA
    await database.execute(
        schema,
        ("conversations", "old", "Be brief.", updated, updated, 2),
        ("conversation_turns", "old", 1, "user", "remember 42", updated),
        ("conversation_turns", "old", 2, "assistant", "noted", updated),
    )


async def test_old_database_without_key_keeps_its_conversations(database: Database, clock: FakeClock) -> None:
    await write_old_database(database, clock.now)
    upgraded = database.store(clock=clock, legacy_owner=NO_KEY)
    await upgraded.start()
    try:
        conversation = await upgraded.get("old", owner=NO_KEY)
        assert conversation is not None and conversation.system == "Be brief."
        assert contents(conversation) == ["remember 42", "noted"]
        assert await upgraded.append_exchange("old", None, "what number?", "42", owner=NO_KEY, create=False)
        assert contents(await upgraded.get("old", owner=NO_KEY))[-2:] == ["what number?", "42"]
        assert await upgraded.get("old", owner=ALICE) is None

        # A replica still on the old version (rolling upgrade) inserts rows without an owner.
        await database.execute(
            "INSERT INTO conversations (id, system, created, updated) "
            f"VALUES ('from-old-replica', NULL, {clock.now!r}, {clock.now!r})"
        )
        assert await upgraded.get("from-old-replica", owner=NO_KEY) is not None
    finally:
        await upgraded.close()


async def test_old_database_with_keys_hides_conversations_nobody_can_claim(
    database: Database, clock: FakeClock
) -> None:
    await write_old_database(database, clock.now)
    upgraded = database.store(clock=clock, legacy_owner=UNKNOWN_OWNER)
    await upgraded.start()
    try:
        for owner in (NO_KEY, ALICE, BOB):
            assert await upgraded.get("old", owner=owner) is None
            assert await upgraded.list_recent(10, owner=owner) == []
            assert not await upgraded.delete("old", owner=owner)
        # They still expire with the TTL.
        clock.now += TTL_S + 1
        assert await upgraded.purge_expired() == 1
    finally:
        await upgraded.close()


async def test_replicas_upgrading_one_database_together(database: Database, clock: FakeClock) -> None:
    await write_old_database(database, clock.now)
    replicas = [database.store(clock=clock, legacy_owner=NO_KEY) for _ in range(4)]
    await asyncio.gather(*(replica.start() for replica in replicas))
    try:
        found = await asyncio.gather(*(replica.get("old", owner=NO_KEY) for replica in replicas))
        assert [contents(conversation) for conversation in found] == [["remember 42", "noted"]] * 4
        assert await replicas[0].append_exchange("new", None, "q", "a", owner=ALICE, create=True)
        assert await replicas[3].get("new", owner=ALICE) is not None
    finally:
        for replica in replicas:
            await replica.close()


def test_build_store_gives_old_rows_to_callers_without_key_only_when_no_key_is_set(tmp_path: Path) -> None:
    without_keys = build_store(load_settings({"HF_HOME": str(tmp_path)}))
    with_keys = build_store(load_settings({"HF_HOME": str(tmp_path), "API_KEY": "k1,k2"}))
    assert without_keys is not None and without_keys.legacy_owner == NO_KEY
    assert with_keys is not None and with_keys.legacy_owner == UNKNOWN_OWNER


# --- Timeouts and an unreachable database ----------------------------------------------------------------


class SilentServer:
    """Stand-in for a database host that accepts TCP connections and never answers.

    A real PostgreSQL cannot be made to hang on demand; this is what a hung server, or a
    firewall that drops the replies, looks like to a client.
    """

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._held: list[asyncio.StreamWriter] = []
        self.port = 0

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._held:
            writer.close()
        await self._server.wait_closed()

    async def _hold(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._held.append(writer)


async def test_a_server_that_never_answers_times_out_and_start_survives(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="app.generate.store")
    async with SilentServer() as silent, asyncio.timeout(HANG_GUARD_S):
        store = PostgresConversationStore(
            f"postgresql://postgres:s3cret@127.0.0.1:{silent.port}/app", ttl_s=TTL_S, timeout_s=SHORT_TIMEOUT_S
        )
        await store.start()  # does not raise, does not wait for the database

        async def warned() -> list[str]:
            return store_warnings(caplog)

        await eventually(warned, "the warning about the unreachable database")
        with pytest.raises(ConversationStoreError) as first:
            await store.get("c1", owner=ALICE)
        with pytest.raises(ConversationStoreError):
            await store.append_exchange("c1", None, "q", "a", owner=ALICE, create=True)
        with pytest.raises(ConversationStoreError):
            await store.list_recent(10, owner=ALICE)
        await store.close()

    [warning] = store_warnings(caplog)
    assert f"timed out after {SETTING}={SHORT_TIMEOUT_S:g}s while connecting" in warning
    assert "s3cret" not in warning
    message = str(first.value)
    assert "PostgreSQL" in message and SETTING in message and "connect" in message


async def test_a_write_lock_held_by_another_process_times_out(database: Database) -> None:
    store = database.store(timeout_s=SHORT_TIMEOUT_S)
    await store.start()
    try:
        await eventually(lambda: store.append_exchange("c1", None, "q1", "a1", owner=ALICE, create=True), "a first write")
        async with asyncio.timeout(HANG_GUARD_S), hold_write_lock(database):
            with pytest.raises(ConversationStoreError, match=f"timed out after {SETTING}=") as refused:
                await store.append_exchange("c1", None, "q2", "a2", owner=ALICE, create=False)
            assert "storing an exchange" in str(refused.value)

        await eventually(
            lambda: store.append_exchange("c1", None, "q3", "a3", owner=ALICE, create=False),
            "an append once the lock is released",
        )
        conversation = await eventually(lambda: store.get("c1", owner=ALICE), "reading")
        assert contents(conversation)[:2] == ["q1", "a1"]
    finally:
        await store.close()


class hold_write_lock:
    """Another process holding the lock the store's next write needs, until the block ends."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self._process: asyncio.subprocess.Process | None = None
        self._conn: asyncpg.Connection | None = None

    async def __aenter__(self) -> None:
        if self.database.backend == "sqlite":
            # A separate process, as another wrapper worker would be; it holds the lock until stdin closes.
            script = (
                "import sqlite3, sys\n"
                "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
                "db.execute('BEGIN IMMEDIATE')\n"
                "print('locked', flush=True)\n"
                "sys.stdin.read()\n"
            )
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-c", script, self.database.target,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )
            assert self._process.stdout is not None
            assert (await self._process.stdout.readline()).strip() == b"locked"
            return
        # Another replica's transaction that has locked every conversation row.
        self._conn = await asyncpg.connect(self.database.target)
        await self._conn.execute("BEGIN")
        await self._conn.execute("SELECT id FROM conversations FOR UPDATE")

    async def __aexit__(self, *_: object) -> None:
        if self._process is not None:
            assert self._process.stdin is not None
            self._process.stdin.close()
            await self._process.wait()
        if self._conn is not None:
            self._conn.terminate()  # the server rolls the transaction back; works even after a crash


class HangingVolume:
    """Stand-in for a network volume that stops answering, then recovers (no test can hang a real one).

    While hung, every statement on the SQLite connections opened during the test blocks in
    its thread, as a read or write on a hung NFS mount would.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._answering = threading.Event()
        self._answering.set()
        volume = self
        real_connect = sqlite3.connect

        class Connection(sqlite3.Connection):
            def execute(self, *args: Any) -> sqlite3.Cursor:
                volume._answering.wait()
                return super().execute(*args)

            def executemany(self, *args: Any) -> sqlite3.Cursor:
                volume._answering.wait()
                return super().executemany(*args)

        def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
            return real_connect(*args, **kwargs, factory=Connection)

        monkeypatch.setattr(sqlite3, "connect", connect)

    def hang(self) -> None:
        self._answering.clear()

    def recover(self) -> None:
        self._answering.set()


async def test_a_hung_sqlite_volume_times_out_and_recovers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    volume = HangingVolume(monkeypatch)
    store = SQLiteConversationStore(tmp_path / SQLITE_FILE_NAME, ttl_s=TTL_S, timeout_s=SHORT_TIMEOUT_S)
    await store.start()
    try:
        await eventually(lambda: store.append_exchange("c1", None, "q1", "a1", owner=ALICE, create=True), "a first write")
        volume.hang()
        async with asyncio.timeout(HANG_GUARD_S):
            for operation in (
                store.append_exchange("c1", None, "q2", "a2", owner=ALICE, create=False),
                store.append_exchange("c1", None, "q3", "a3", owner=ALICE, create=False),
                store.get("c1", owner=ALICE),
                store.delete("c1", owner=ALICE),
            ):
                with pytest.raises(ConversationStoreError, match=f"SQLite conversation store timed out after {SETTING}="):
                    await operation
        volume.recover()

        conversation = await eventually(lambda: store.get("c1", owner=ALICE), "reading once the volume answers again")
        # A write that had begun when its caller gave up may land; none lands in pieces.
        assert len(conversation.turns) % 2 == 0
        for user, assistant in zip(conversation.turns[0::2], conversation.turns[1::2], strict=True):
            assert assistant.content == user.content.replace("q", "a")
    finally:
        volume.recover()
        await store.close()


async def test_sqlite_unreachable_at_start_works_once_it_is_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.generate.store")
    blocker = tmp_path / "volume"
    blocker.write_text("a file where the cache directory should be")
    store = SQLiteConversationStore(blocker / SQLITE_FILE_NAME, ttl_s=TTL_S, timeout_s=SHORT_TIMEOUT_S)
    await store.start()
    try:
        with pytest.raises(ConversationStoreError, match="SQLite conversation store"):
            await store.get("c1", owner=ALICE)
        blocker.unlink()

        await eventually(
            lambda: store.append_exchange("c1", None, "q", "a", owner=ALICE, create=True),
            "storing once the directory can be created",
        )
        conversation = await eventually(lambda: store.get("c1", owner=ALICE), "reading")
        assert contents(conversation)[:2] == ["q", "a"]
    finally:
        await store.close()
    assert len(store_warnings(caplog)) == 1


async def test_postgres_down_at_start_works_once_it_is_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="app.generate.store")
    port = free_port()
    store = PostgresConversationStore(
        f"postgresql://postgres@127.0.0.1:{port}/postgres", ttl_s=TTL_S, timeout_s=SHORT_TIMEOUT_S
    )
    await store.start()  # does not raise
    try:
        with pytest.raises(ConversationStoreError, match="PostgreSQL conversation store"):
            await store.get("c1", owner=ALICE)
        with running_postgres(port):
            await eventually(
                lambda: store.append_exchange("c1", None, "q", "a", owner=ALICE, create=True),
                "storing once PostgreSQL is up",
            )
            conversation = await eventually(lambda: store.get("c1", owner=ALICE), "reading")
            assert contents(conversation)[:2] == ["q", "a"]
    finally:
        await store.close()
    assert len(store_warnings(caplog)) == 1, "one warning, however many requests failed"


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A server of this test's own, which it may stop and start again."""
    with running_postgres(free_port()) as server:
        yield server


async def test_postgres_stopped_mid_operation_fails_then_recovers(own_postgres: PostgresServer) -> None:
    store = PostgresConversationStore(own_postgres.dsn, ttl_s=TTL_S, timeout_s=TIMEOUT_S)
    await store.start()
    try:
        assert await store.append_exchange("c1", None, "q1", "a1", owner=ALICE, create=True)
        database = Database("postgres", own_postgres.dsn)
        async with asyncio.timeout(HANG_GUARD_S), hold_write_lock(database):
            blocked = asyncio.create_task(store.append_exchange("c1", None, "q2", "a2", owner=ALICE, create=False))
            await wait_for_lock_waiter(own_postgres.dsn)
            await asyncio.to_thread(own_postgres.stop_keeping_data)
            with pytest.raises(ConversationStoreError) as lost:
                await blocked
        assert "timed out" not in str(lost.value), "the lost connection is noticed, not waited out"
        with pytest.raises(ConversationStoreError):
            await store.get("c1", owner=ALICE)

        await asyncio.to_thread(own_postgres.start_again)

        conversation = await eventually(lambda: store.get("c1", owner=ALICE), "reading once PostgreSQL is back")
        assert contents(conversation) == ["q1", "a1"]
        assert await store.append_exchange("c1", None, "q3", "a3", owner=ALICE, create=False)
    finally:
        await store.close()


async def wait_for_lock_waiter(dsn: str) -> None:
    """Until some backend waits on a row lock: the store's write has reached the server."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + EVENT_DEADLINE_S
        while not await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"):
            assert time.monotonic() < deadline, "the store's write never reached the server"
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def test_postgres_database_recreated_empty_gets_its_tables_again(postgres_server: PostgresServer) -> None:
    name = f"test_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(postgres_server.dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        store = PostgresConversationStore(postgres_server.dsn_for(name), ttl_s=TTL_S, timeout_s=TIMEOUT_S)
        await store.start()
        try:
            assert await store.append_exchange("c1", None, "q", "a", owner=ALICE, create=True)
            await Database("postgres", postgres_server.dsn_for(name)).execute(
                "DROP TABLE conversation_turns; DROP TABLE conversations"
            )

            await eventually(
                lambda: store.append_exchange("c2", None, "q", "a", owner=ALICE, create=True),
                "storing after the tables were dropped",
            )
            assert await store.get("c1", owner=ALICE) is None
        finally:
            await store.close()
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


# --- Settings --------------------------------------------------------------------------------------------


def test_build_store_follows_the_settings(tmp_path: Path) -> None:
    assert build_store(load_settings({"CONVERSATIONS_ENABLED": "false"})) is None

    sqlite = build_store(load_settings({
        "HF_HOME": str(tmp_path), "CONVERSATIONS_TTL_S": "30", "CONVERSATIONS_DB_TIMEOUT_S": "2.5",
    }))
    assert isinstance(sqlite, SQLiteConversationStore)
    assert sqlite.path == tmp_path / SQLITE_FILE_NAME
    assert (sqlite.ttl_s, sqlite.timeout_s) == (30, 2.5)

    postgres = build_store(load_settings({"CONVERSATIONS_DB_URL": "postgresql://u:pw@db:5432/app"}))
    assert isinstance(postgres, PostgresConversationStore)


@pytest.mark.parametrize("url", ["mysql://u:s3cret@db/app", "postgresql://u:s3cret@db:port/app", "postgresql://[s3cret"])
def test_a_bad_database_url_fails_at_start_without_showing_it(url: str) -> None:
    with pytest.raises(ConfigError, match="CONVERSATIONS_DB_URL.*postgresql://user:password@host:port/database") as bad:
        load_settings({"CONVERSATIONS_DB_URL": url})
    assert "s3cret" not in str(bad.value)


def test_each_runpod_worker_keeps_its_own_sqlite_file_on_a_network_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers share /runpod-volume, and SQLite's WAL does not work across hosts: one file per worker there."""
    local = load_settings({"HF_HOME": "/data/cache"})
    assert sqlite_path(local, "worker-a") == Path("/data/cache") / SQLITE_FILE_NAME, "a pod's own disk is not shared"
    settings = load_settings({})
    monkeypatch.setattr(type(settings), "cache_dir", property(lambda _: RUNPOD_VOLUME / "huggingface-cache"))
    assert sqlite_path(settings, "worker-a") == RUNPOD_VOLUME / "huggingface-cache" / "conversations-worker-a.sqlite3"
    assert sqlite_path(settings, None) == RUNPOD_VOLUME / "huggingface-cache" / SQLITE_FILE_NAME
