"""Where `/generate` keeps conversations: SQLite by default, PostgreSQL when shared.

A conversation is a row with its owner, system prompt and timestamps, and its
turns are rows numbered by a per-conversation sequence. Appending an exchange
(the user's turn and the reply) is one transaction that first bumps the
conversation's turn counter (which locks that conversation) and then inserts
both turns under the new numbers, so concurrent requests on one conversation
never overwrite each other's turns and each exchange stays in one piece.

Owners. A conversation belongs to the API key that created it, stored as
`owner_of(key)` (a hash, never the key; "" when no key is configured). Every
operation takes the owner and sees only that owner's conversations: another
owner's conversation looks exactly like a missing one. Databases created
before owners existed are migrated when opened: their rows get the owner ""
when no API_KEY is set (they stay readable, as before), else `UNKNOWN_OWNER`,
which no key maps to (nobody can tell which key created them; they expire
with the TTL).

Nothing may hang, since a /generate request waits on the store. A caller waits
at most `CONVERSATIONS_DB_TIMEOUT_S` for an operation, and every wait inside it
(connect, pool acquire, each command, a lock held by another process) is
bounded by the same setting, so work that outlives its caller still ends on
its own; it is never cut off mid-transaction, so a timed-out write may still
be applied when the database answers late. A database that is down does not
stop the wrapper: `start()` only begins connecting and warns once; each
operation connects (and creates or migrates the schema) when needed, fails at
once with `ConversationStoreError` for `CONVERSATIONS_DB_TIMEOUT_S` after a
failed attempt, and works again as soon as the database is back.

- SQLite (default): one file in the cache directory, so conversations live on
  the model cache volume and survive restarts. sqlite3 blocks, so each
  transaction runs whole on one thread; writes are `BEGIN IMMEDIATE` with a
  busy timeout, so several wrapper processes (WORKERS) can share the file.
- PostgreSQL (`CONVERSATIONS_DB_URL`): for replicas behind a load balancer.

Conversations idle longer than `CONVERSATIONS_TTL_S` are invisible at once and
deleted lazily when looked up, and by a periodic purge.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import os
import queue
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import asyncpg

from app.config import RUNPOD_VOLUME, Settings

log = logging.getLogger(__name__)

SQLITE_FILE_NAME = "conversations.sqlite3"
# Set by RunPod in every pod and serverless worker.
RUNPOD_WORKER_ENV = "RUNPOD_POD_ID"
PURGE_INTERVAL_S = 300.0
POSTGRES_POOL_SIZE = 10
# pg_advisory_xact_lock key that serializes schema creation and migration between replicas starting together.
POSTGRES_SCHEMA_LOCK = 0x67656E_636F6E76
# Owner of rows from before owners existed, on a deployment with API keys: no key hashes to it.
UNKNOWN_OWNER = "unknown"

T = TypeVar("T")
Role = Literal["user", "assistant"]


class ConversationStoreError(RuntimeError):
    """The database failed, timed out or cannot be reached; the message says which and why."""


def owner_of(api_key: str | bytes | None) -> str:
    """The owner of what a caller stores: the sha256 hex of its API key, or "" when no key is configured.

    A key as str or as the bytes of its UTF-8 encoding gives the same owner.
    """
    if api_key is None:
        return ""
    return hashlib.sha256(api_key.encode() if isinstance(api_key, str) else api_key).hexdigest()


@dataclass(frozen=True, slots=True)
class Turn:
    role: Role
    content: str
    created: float


@dataclass(frozen=True, slots=True)
class ConversationSummary:
    id: str
    created: float
    updated: float
    turn_count: int


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    system: str | None
    created: float
    updated: float
    turns: tuple[Turn, ...]

    def messages(self) -> list[dict[str, str]]:
        return [{"role": turn.role, "content": turn.content} for turn in self.turns]


@dataclass(slots=True)
class _Step:
    """What an operation is doing, for the message when it times out."""

    what: str


class ConversationStore(ABC):
    """Async conversation storage with an idle TTL; `await start()` before use, `await close()` after."""

    backend: str
    driver_errors: tuple[type[BaseException], ...]
    # Errors that mean the tables are gone (a database recreated empty): the next operation creates them again.
    schema_errors: tuple[type[BaseException], ...] = ()

    def __init__(
        self,
        *,
        ttl_s: float,
        timeout_s: float,
        legacy_owner: str = UNKNOWN_OWNER,
        purge_interval_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.legacy_owner = legacy_owner
        self._purge_interval_s = purge_interval_s if purge_interval_s is not None else min(PURGE_INTERVAL_S, ttl_s)
        self._clock = clock
        self._background: list[asyncio.Task[None]] = []
        self._operations: set[asyncio.Task[Any]] = set()
        self._opened = False
        self._opening = asyncio.Lock()
        self._retry_at = 0.0  # time.monotonic() before which a failed connection is not tried again
        self._unreachable = ""  # why the last connection attempt failed

    async def start(self) -> None:
        """Begin connecting in the background and purging; never raises for an unreachable database."""
        self._background = [
            asyncio.create_task(self._connect_at_start(), name="conversation-store-connect"),
            asyncio.create_task(self._purge_periodically(), name="conversation-purge"),
        ]

    async def close(self) -> None:
        """Stop background work and close the database; never raises, waits at most twice `timeout_s`."""
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._background = []
        if self._operations:
            _, unfinished = await asyncio.wait(self._operations, timeout=self.timeout_s)
            for task in unfinished:
                task.cancel()
        self._opened = False
        try:
            await self._close()
        except (TimeoutError, *self.driver_errors) as exc:
            log.warning("Closing the %s conversation store failed: %s", self.backend, _describe(exc))

    async def get(self, conversation_id: str, *, owner: str) -> Conversation | None:
        """The owner's conversation with its turns in order, or None when unknown, expired or not the owner's."""
        conversation = await self._run("reading a conversation", lambda: self._get(owner, conversation_id))
        if conversation is None:
            return None
        if conversation.updated < self._cutoff():
            with contextlib.suppress(ConversationStoreError):  # the periodic purge deletes it otherwise
                await self.purge_expired()
            return None
        return conversation

    async def list_recent(self, limit: int, *, owner: str) -> list[ConversationSummary]:
        """The owner's live conversations, most recently updated first."""
        cutoff = self._cutoff()
        return await self._run("listing conversations", lambda: self._list(owner, cutoff, limit))

    async def append_exchange(
        self, conversation_id: str, system: str | None, user: str, assistant: str, *, owner: str, create: bool
    ) -> bool:
        """Store a user turn and its reply atomically; False when the owner has no such conversation.

        With `create`, a conversation the owner does not have yet is created under `conversation_id`
        (False when another owner holds that id). A non-None `system` replaces the system prompt.
        """
        turns: tuple[tuple[Role, str], ...] = (("user", user), ("assistant", assistant))
        now = self._clock()
        return await self._run(
            "storing an exchange", lambda: self._append(owner, conversation_id, system, turns, create, now)
        )

    async def delete(self, conversation_id: str, *, owner: str) -> bool:
        """Delete the owner's conversation and its turns; False when unknown, expired or not the owner's."""
        updated = await self._run("deleting a conversation", lambda: self._delete(owner, conversation_id))
        return updated is not None and updated >= self._cutoff()

    async def purge_expired(self) -> int:
        """Delete every conversation idle longer than the TTL, whoever owns it; returns how many."""
        cutoff = self._cutoff()
        return await self._run("purging expired conversations", lambda: self._purge(cutoff))

    def _cutoff(self) -> float:
        return self._clock() - self.ttl_s

    async def _connect_at_start(self) -> None:
        try:
            await self._run("connecting", _nothing)
        except ConversationStoreError as exc:
            log.warning("%s. Conversations are unavailable until it answers; each request tries again.", exc)

    async def _purge_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._purge_interval_s)
            try:
                purged = await self.purge_expired()
            except ConversationStoreError as exc:
                log.warning("Purging expired conversations failed: %s", exc)
                continue
            if purged:
                log.info("Purged %d conversation(s) idle longer than CONVERSATIONS_TTL_S=%g", purged, self.ttl_s)

    async def _run(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one operation, connecting first when needed; the caller waits at most `timeout_s`.

        The operation runs as its own task, shielded from the caller's timeout and cancellation:
        cutting it short could leave a transaction or a pooled connection half done, and every wait
        inside it is bounded by `timeout_s`, so it ends on its own soon after its caller gave up.
        """
        step = _Step(what)
        task = asyncio.create_task(self._connected(step, operation))
        self._operations.add(task)
        task.add_done_callback(self._settled)
        try:
            async with asyncio.timeout(self.timeout_s):
                return await asyncio.shield(task)
        except TimeoutError as exc:
            reason = f": {exc}" if str(exc) else ""
            raise ConversationStoreError(
                f"The {self.backend} conversation store timed out after "
                f"CONVERSATIONS_DB_TIMEOUT_S={self.timeout_s:g}s while {step.what}{reason}"
            ) from None
        except self.driver_errors as exc:
            raise ConversationStoreError(
                f"The {self.backend} conversation store failed while {step.what}: {_describe(exc)}"
            ) from exc

    async def _connected(self, step: _Step, operation: Callable[[], Awaitable[T]]) -> T:
        if not self._opened:
            what, step.what = step.what, "connecting"
            await self._ensure_open()
            step.what = what
        try:
            return await operation()
        except self.schema_errors:
            self._opened = False
            raise

    async def _ensure_open(self) -> None:
        """Connect and create (or migrate) the schema unless done; after a failure, refuse at once for `timeout_s`."""
        async with asyncio.timeout(self.timeout_s):
            await self._opening.acquire()
        try:
            if self._opened:
                return
            wait_s = self._retry_at - time.monotonic()
            if wait_s > 0:
                raise ConversationStoreError(
                    f"The {self.backend} conversation store is unavailable ({self._unreachable}); "
                    f"the next attempt to connect is in {max(wait_s, 0.1):.1f}s"
                )
            try:
                await self._open()
            except (TimeoutError, *self.driver_errors) as exc:
                self._retry_at = time.monotonic() + self.timeout_s
                self._unreachable = _describe(exc, self.timeout_s)
                raise
            self._opened = True
            if self._unreachable:
                log.info("The %s conversation store answers again", self.backend)
                self._unreachable = ""
        finally:
            self._opening.release()

    def _settled(self, task: asyncio.Task[Any]) -> None:
        self._operations.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a caller that gave up has already reported the failure

    @abstractmethod
    async def _open(self) -> None:
        """Connect and create or migrate the schema; safe to call again after a failure."""

    @abstractmethod
    async def _close(self) -> None: ...

    @abstractmethod
    async def _get(self, owner: str, conversation_id: str) -> Conversation | None: ...

    @abstractmethod
    async def _list(self, owner: str, cutoff: float, limit: int) -> list[ConversationSummary]: ...

    @abstractmethod
    async def _append(
        self,
        owner: str,
        conversation_id: str,
        system: str | None,
        turns: tuple[tuple[Role, str], ...],
        create: bool,
        now: float,
    ) -> bool: ...

    @abstractmethod
    async def _delete(self, owner: str, conversation_id: str) -> float | None:
        """Delete; returns the conversation's `updated` time, or None when the owner had no such conversation."""

    @abstractmethod
    async def _purge(self, cutoff: float) -> int: ...


async def _nothing() -> None:
    return None


def _describe(exc: BaseException, timeout_s: float | None = None) -> str:
    if isinstance(exc, TimeoutError) and not str(exc) and timeout_s is not None:
        return f"no answer within CONVERSATIONS_DB_TIMEOUT_S={timeout_s:g}s"
    return f"{type(exc).__name__}: {exc}"


# The schema is built in steps, the way it grew, so new and old databases take the same path: the
# tables of the first version, then the owner column, whose default (the legacy owner) also covers rows
# that a replica still on the first version inserts during a rolling upgrade, then the indexes.
_SQLITE_TABLES = (
    """CREATE TABLE IF NOT EXISTS conversations (
        id TEXT PRIMARY KEY,
        system TEXT,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        turn_count INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE IF NOT EXISTS conversation_turns (
        conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content TEXT NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY (conversation_id, seq)
    )""",
)
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS conversations_updated ON conversations (updated)",
    "CREATE INDEX IF NOT EXISTS conversations_owner_updated ON conversations (owner, updated)",
)


_Job = tuple[concurrent.futures.Future[Any], Callable[[], Any]]


class _SQLiteThread:
    """The one thread that owns a SQLite connection and runs each job (a whole transaction) to its end.

    A job whose caller stopped waiting before it began is skipped. The thread is a daemon, so a
    call stuck on a hung volume cannot keep the process from exiting.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="conversations-sqlite", daemon=True).start()

    def submit(self, job: Callable[[], T]) -> asyncio.Future[T]:
        """The job's result; cancelling it before the job began skips the job."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((future, job))
        return asyncio.wrap_future(future)

    def stop(self) -> None:
        """End the thread once the jobs queued so far are done."""
        self._jobs.put(None)

    def _serve(self) -> None:
        while (item := self._jobs.get()) is not None:
            future, job = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job())
            except BaseException as exc:  # noqa: BLE001 - the caller gets every failure of its job
                future.set_exception(exc)


@contextlib.contextmanager
def _lock_waits_time_out() -> Iterator[None]:
    """A lock another process still holds after the busy timeout (CONVERSATIONS_DB_TIMEOUT_S) is a timeout."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            raise TimeoutError("the database file is locked by another process") from exc
        raise


def _switch_to_wal(db: sqlite3.Connection, timeout_s: float) -> None:
    """WAL mode; another process opening the same new file at once can make SQLite refuse
    the switch at once, without its busy timeout, so it is retried until the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            busy = exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not busy or time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def _sqlite_transaction(db: sqlite3.Connection, mode: Literal["DEFERRED", "IMMEDIATE"], work: Callable[[], T]) -> T:
    with _lock_waits_time_out():
        db.execute(f"BEGIN {mode}")
        try:
            result = work()
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise
    return result


class SQLiteConversationStore(ConversationStore):
    backend = "SQLite"
    driver_errors = (sqlite3.Error, OSError)

    def __init__(
        self,
        path: Path,
        *,
        ttl_s: float,
        timeout_s: float,
        legacy_owner: str = UNKNOWN_OWNER,
        purge_interval_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            ttl_s=ttl_s, timeout_s=timeout_s, legacy_owner=legacy_owner, purge_interval_s=purge_interval_s, clock=clock
        )
        self.path = path
        self._thread: _SQLiteThread | None = None
        self._db: sqlite3.Connection | None = None  # used on `_thread` only

    async def start(self) -> None:
        if self._thread is None:
            self._thread = _SQLiteThread()
        await super().start()

    async def _in_thread(self, job: Callable[[], T]) -> T:
        if self._thread is None:
            raise ConversationStoreError("The SQLite conversation store is not started (call start() first).")
        async with asyncio.timeout(self.timeout_s):
            return await self._thread.submit(job)

    async def _transaction(self, mode: Literal["DEFERRED", "IMMEDIATE"], work: Callable[[sqlite3.Connection], T]) -> T:
        def job() -> T:
            if self._db is None:
                raise ConversationStoreError("The SQLite conversation store is not connected.")
            db = self._db
            return _sqlite_transaction(db, mode, lambda: work(db))

        return await self._in_thread(job)

    async def _open(self) -> None:
        await self._in_thread(self._connect)

    def _connect(self) -> None:
        if self._db is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
        try:
            with _lock_waits_time_out():
                _switch_to_wal(db, self.timeout_s)
                db.execute("PRAGMA foreign_keys = ON")
            _sqlite_transaction(db, "IMMEDIATE", lambda: self._create_schema(db))
        except BaseException:
            db.close()
            raise
        self._db = db

    def _create_schema(self, db: sqlite3.Connection) -> None:
        for statement in _SQLITE_TABLES:
            db.execute(statement)
        columns = {row[1] for row in db.execute("PRAGMA table_info(conversations)")}
        if "owner" not in columns:
            [(rows,)] = db.execute("SELECT count(*) FROM conversations")
            [(default,)] = db.execute("SELECT quote(?)", (self.legacy_owner,))
            db.execute(f"ALTER TABLE conversations ADD COLUMN owner TEXT NOT NULL DEFAULT {default}")
            _log_migration(self.backend, rows, self.legacy_owner)
        for statement in _INDEXES:
            db.execute(statement)

    async def _close(self) -> None:
        if self._thread is None:
            return
        thread, self._thread = self._thread, None
        try:
            async with asyncio.timeout(self.timeout_s):
                await thread.submit(self._disconnect)
        finally:
            thread.stop()

    def _disconnect(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def _get(self, owner: str, conversation_id: str) -> Conversation | None:
        def read(db: sqlite3.Connection) -> Conversation | None:
            row = db.execute(
                "SELECT system, created, updated FROM conversations WHERE id = ? AND owner = ?",
                (conversation_id, owner),
            ).fetchone()
            if row is None:
                return None
            rows = db.execute(
                "SELECT role, content, created FROM conversation_turns WHERE conversation_id = ? ORDER BY seq",
                (conversation_id,),
            ).fetchall()
            system, created, updated = row
            return Conversation(conversation_id, system, created, updated, tuple(Turn(*r) for r in rows))

        return await self._transaction("DEFERRED", read)

    async def _list(self, owner: str, cutoff: float, limit: int) -> list[ConversationSummary]:
        def read(db: sqlite3.Connection) -> list[ConversationSummary]:
            rows = db.execute(
                "SELECT id, created, updated, turn_count FROM conversations WHERE owner = ? AND updated >= ? "
                "ORDER BY updated DESC LIMIT ?",
                (owner, cutoff, limit),
            ).fetchall()
            return [ConversationSummary(*row) for row in rows]

        return await self._transaction("DEFERRED", read)

    async def _append(
        self,
        owner: str,
        conversation_id: str,
        system: str | None,
        turns: tuple[tuple[Role, str], ...],
        create: bool,
        now: float,
    ) -> bool:
        def write(db: sqlite3.Connection) -> bool:
            if create:
                db.execute(
                    "INSERT INTO conversations (id, owner, system, created, updated) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (id) DO NOTHING",
                    (conversation_id, owner, system, now, now),
                )
            row = db.execute(
                "UPDATE conversations SET turn_count = turn_count + ?, updated = ?, system = COALESCE(?, system) "
                "WHERE id = ? AND owner = ? RETURNING turn_count",
                (len(turns), now, system, conversation_id, owner),
            ).fetchone()
            if row is None:
                return False
            first_seq = row[0] - len(turns) + 1
            db.executemany(
                "INSERT INTO conversation_turns (conversation_id, seq, role, content, created) VALUES (?, ?, ?, ?, ?)",
                [(conversation_id, first_seq + i, role, content, now) for i, (role, content) in enumerate(turns)],
            )
            return True

        return await self._transaction("IMMEDIATE", write)

    async def _delete(self, owner: str, conversation_id: str) -> float | None:
        def write(db: sqlite3.Connection) -> float | None:
            row = db.execute(
                "DELETE FROM conversations WHERE id = ? AND owner = ? RETURNING updated", (conversation_id, owner)
            ).fetchone()
            return None if row is None else row[0]

        return await self._transaction("IMMEDIATE", write)

    async def _purge(self, cutoff: float) -> int:
        def write(db: sqlite3.Connection) -> int:
            return db.execute("DELETE FROM conversations WHERE updated < ?", (cutoff,)).rowcount

        return await self._transaction("IMMEDIATE", write)


_POSTGRES_TABLES = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    system TEXT,
    created DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
    turn_count INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS conversation_turns (
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (conversation_id, seq)
);
"""
_POSTGRES_ADD_OWNER = (
    "SELECT format('ALTER TABLE conversations ADD COLUMN owner TEXT NOT NULL DEFAULT %L', $1::text)"
)
_POSTGRES_HAS_OWNER = """
SELECT EXISTS (
    SELECT 1 FROM information_schema.columns
    WHERE table_schema = current_schema() AND table_name = 'conversations' AND column_name = 'owner'
)
"""


class PostgresConversationStore(ConversationStore):
    backend = "PostgreSQL"
    driver_errors = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)
    schema_errors = (asyncpg.UndefinedTableError,)

    def __init__(
        self,
        dsn: str,
        *,
        ttl_s: float,
        timeout_s: float,
        legacy_owner: str = UNKNOWN_OWNER,
        purge_interval_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            ttl_s=ttl_s, timeout_s=timeout_s, legacy_owner=legacy_owner, purge_interval_s=purge_interval_s, clock=clock
        )
        self._dsn = dsn
        self._pool: asyncpg.Pool | None = None

    def _connection(self) -> asyncpg.pool.PoolAcquireContext:
        """A pooled connection; the acquire (connecting included) and the reset on release are bounded."""
        if self._pool is None:
            raise ConversationStoreError("The PostgreSQL conversation store is not started (call start() first).")
        return self._pool.acquire(timeout=self.timeout_s)

    async def _open(self) -> None:
        if self._pool is None:
            # min_size=0: creating the pool connects nothing; each acquire connects when needed and so
            # reconnects by itself after the server comes back. Every command is bounded by command_timeout.
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=0,
                max_size=POSTGRES_POOL_SIZE,
                timeout=self.timeout_s,
                command_timeout=self.timeout_s,
            )
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", POSTGRES_SCHEMA_LOCK)
            await conn.execute(_POSTGRES_TABLES)
            if not await conn.fetchval(_POSTGRES_HAS_OWNER):
                rows = await conn.fetchval("SELECT count(*) FROM conversations")
                await conn.execute(await conn.fetchval(_POSTGRES_ADD_OWNER, self.legacy_owner))
                _log_migration(self.backend, rows, self.legacy_owner)
            for statement in _INDEXES:
                await conn.execute(statement)

    async def _close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            async with asyncio.timeout(self.timeout_s):
                await pool.close()  # terminates every connection when cut short

    async def _get(self, owner: str, conversation_id: str) -> Conversation | None:
        async with self._connection() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            row = await conn.fetchrow(
                "SELECT system, created, updated FROM conversations WHERE id = $1 AND owner = $2",
                conversation_id,
                owner,
            )
            if row is None:
                return None
            turn_rows = await conn.fetch(
                "SELECT role, content, created FROM conversation_turns WHERE conversation_id = $1 ORDER BY seq",
                conversation_id,
            )
        turns = tuple(Turn(r["role"], r["content"], r["created"]) for r in turn_rows)
        return Conversation(conversation_id, row["system"], row["created"], row["updated"], turns)

    async def _list(self, owner: str, cutoff: float, limit: int) -> list[ConversationSummary]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT id, created, updated, turn_count FROM conversations WHERE owner = $1 AND updated >= $2 "
                "ORDER BY updated DESC LIMIT $3",
                owner,
                cutoff,
                limit,
            )
        return [ConversationSummary(r["id"], r["created"], r["updated"], r["turn_count"]) for r in rows]

    async def _append(
        self,
        owner: str,
        conversation_id: str,
        system: str | None,
        turns: tuple[tuple[Role, str], ...],
        create: bool,
        now: float,
    ) -> bool:
        async with self._connection() as conn, conn.transaction():
            if create:
                await conn.execute(
                    "INSERT INTO conversations (id, owner, system, created, updated) VALUES ($1, $2, $3, $4, $4) "
                    "ON CONFLICT (id) DO NOTHING",
                    conversation_id,
                    owner,
                    system,
                    now,
                )
            last_seq = await conn.fetchval(
                "UPDATE conversations SET turn_count = turn_count + $1, updated = $2, system = COALESCE($3, system) "
                "WHERE id = $4 AND owner = $5 RETURNING turn_count",
                len(turns),
                now,
                system,
                conversation_id,
                owner,
            )
            if last_seq is None:
                return False
            first_seq = last_seq - len(turns) + 1
            await conn.executemany(
                "INSERT INTO conversation_turns (conversation_id, seq, role, content, created) "
                "VALUES ($1, $2, $3, $4, $5)",
                [(conversation_id, first_seq + i, role, content, now) for i, (role, content) in enumerate(turns)],
            )
        return True

    async def _delete(self, owner: str, conversation_id: str) -> float | None:
        async with self._connection() as conn:
            return await conn.fetchval(
                "DELETE FROM conversations WHERE id = $1 AND owner = $2 RETURNING updated", conversation_id, owner
            )

    async def _purge(self, cutoff: float) -> int:
        async with self._connection() as conn:
            status = await conn.execute("DELETE FROM conversations WHERE updated < $1", cutoff)
        return int(status.split()[-1])  # "DELETE <count>"


def _log_migration(backend: str, rows: int, legacy_owner: str) -> None:
    if not rows:
        return
    whose = "callers without an API key" if legacy_owner == "" else "no API key (they expire with CONVERSATIONS_TTL_S)"
    log.info(
        "Added owners to the %s conversation store: %d conversation(s) from before belong to %s", backend, rows, whose
    )


def sqlite_path(settings: Settings, runpod_worker: str | None) -> Path:
    """The SQLite file: in the cache directory, one per worker on a RunPod network volume.

    Several serverless workers mount the same network volume, and SQLite's
    write-ahead log does not work across hosts: sharing one file would corrupt
    it. Each worker keeps its own file there instead; RunPod's worker affinity
    (X-Runpod-Worker-Id) brings a conversation back to the worker that holds it,
    and CONVERSATIONS_DB_URL gives all workers one store.
    """
    if runpod_worker and settings.cache_dir.is_relative_to(RUNPOD_VOLUME):
        return settings.cache_dir / f"conversations-{runpod_worker}.sqlite3"
    return settings.cache_dir / SQLITE_FILE_NAME


def build_store(settings: Settings) -> ConversationStore | None:
    """The store the settings ask for (not started yet), or None when CONVERSATIONS_ENABLED is false."""
    if not settings.CONVERSATIONS_ENABLED:
        return None
    options: dict[str, Any] = {
        "ttl_s": settings.CONVERSATIONS_TTL_S,
        "timeout_s": settings.CONVERSATIONS_DB_TIMEOUT_S,
        # Rows from before owners existed: readable without a key, as before, or by no key at all.
        "legacy_owner": owner_of(None) if not settings.api_keys else UNKNOWN_OWNER,
    }
    if settings.CONVERSATIONS_DB_URL is None:
        return SQLiteConversationStore(sqlite_path(settings, os.environ.get(RUNPOD_WORKER_ENV)), **options)
    return PostgresConversationStore(settings.CONVERSATIONS_DB_URL.get_secret_value(), **options)
