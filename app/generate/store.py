"""Where `/generate` keeps conversations: SQLite by default, PostgreSQL when shared.

A conversation is a row with its system prompt and timestamps, and its turns
are rows numbered by a per-conversation sequence. Appending an exchange (the
user's turn and the reply) is one transaction that first bumps the
conversation's turn counter (which locks that conversation) and then inserts
both turns under the new numbers, so concurrent requests on one conversation
never overwrite each other's turns and each exchange stays in one piece.

- SQLite (default): one file in the cache directory, so conversations live on
  the model cache volume and survive restarts. Write transactions are
  `BEGIN IMMEDIATE` with a busy timeout, so several wrapper processes
  (WORKERS) can share the file.
- PostgreSQL (`CONVERSATIONS_DB_URL`): for replicas behind a load balancer.

Conversations idle longer than `CONVERSATIONS_TTL_S` are invisible at once and
deleted lazily when looked up, and by a periodic purge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import aiosqlite
import asyncpg

from app.config import ConfigError, Settings

log = logging.getLogger(__name__)

SQLITE_FILE_NAME = "conversations.sqlite3"
PURGE_INTERVAL_S = 300.0
SQLITE_BUSY_TIMEOUT_MS = 10_000
POSTGRES_POOL_SIZE = 10
POSTGRES_CONNECT_TIMEOUT_S = 10.0
# pg_advisory_xact_lock key that serializes schema creation between replicas starting together.
POSTGRES_SCHEMA_LOCK = 0x67656E_636F6E76

T = TypeVar("T")
Role = Literal["user", "assistant"]


class ConversationStoreError(RuntimeError):
    """The database failed or cannot be reached; the message says which and why."""


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


class ConversationStore(ABC):
    """Async conversation storage with an idle TTL; `await start()` before use, `await close()` after."""

    backend: str
    driver_errors: tuple[type[BaseException], ...]

    def __init__(
        self,
        ttl_s: float,
        purge_interval_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ttl_s = ttl_s
        self._purge_interval_s = purge_interval_s if purge_interval_s is not None else min(PURGE_INTERVAL_S, ttl_s)
        self._clock = clock
        self._purger: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._guarded(self._open())
        self._purger = asyncio.create_task(self._purge_periodically(), name="conversation-purge")

    async def close(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purger
            self._purger = None
        await self._close()

    async def get(self, conversation_id: str) -> Conversation | None:
        """The conversation with its turns in order, or None when unknown or expired."""
        conversation = await self._guarded(self._get(conversation_id))
        if conversation is None:
            return None
        if conversation.updated < self._cutoff():
            await self.purge_expired()
            return None
        return conversation

    async def list_recent(self, limit: int) -> list[ConversationSummary]:
        """Live conversations, most recently updated first."""
        return await self._guarded(self._list(self._cutoff(), limit))

    async def append_exchange(
        self, conversation_id: str, system: str | None, user: str, assistant: str, create: bool
    ) -> bool:
        """Store a user turn and its reply atomically; False when the conversation is gone and `create` is off.

        A non-None `system` replaces the conversation's system prompt.
        """
        turns: tuple[tuple[Role, str], ...] = (("user", user), ("assistant", assistant))
        return await self._guarded(self._append(conversation_id, system, turns, create, self._clock()))

    async def delete(self, conversation_id: str) -> bool:
        """Delete a conversation and its turns; False when it was unknown or already expired."""
        updated = await self._guarded(self._delete(conversation_id))
        return updated is not None and updated >= self._cutoff()

    async def purge_expired(self) -> int:
        """Delete every conversation idle longer than the TTL; returns how many."""
        return await self._guarded(self._purge(self._cutoff()))

    def _cutoff(self) -> float:
        return self._clock() - self.ttl_s

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

    async def _guarded(self, operation: Awaitable[T]) -> T:
        try:
            return await operation
        except self.driver_errors as exc:
            raise ConversationStoreError(
                f"The {self.backend} conversation store failed: {type(exc).__name__}: {exc}"
            ) from exc

    @abstractmethod
    async def _open(self) -> None: ...

    @abstractmethod
    async def _close(self) -> None: ...

    @abstractmethod
    async def _get(self, conversation_id: str) -> Conversation | None: ...

    @abstractmethod
    async def _list(self, cutoff: float, limit: int) -> list[ConversationSummary]: ...

    @abstractmethod
    async def _append(
        self,
        conversation_id: str,
        system: str | None,
        turns: tuple[tuple[Role, str], ...],
        create: bool,
        now: float,
    ) -> bool: ...

    @abstractmethod
    async def _delete(self, conversation_id: str) -> float | None:
        """Delete; returns the conversation's `updated` time, or None when it did not exist."""

    @abstractmethod
    async def _purge(self, cutoff: float) -> int: ...


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    system TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    turn_count INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS conversations_updated ON conversations (updated);
CREATE TABLE IF NOT EXISTS conversation_turns (
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (conversation_id, seq)
);
"""


class SQLiteConversationStore(ConversationStore):
    backend = "SQLite"
    driver_errors = (sqlite3.Error, OSError)

    def __init__(
        self,
        path: Path,
        ttl_s: float,
        purge_interval_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(ttl_s, purge_interval_s, clock)
        self.path = path
        self._db: aiosqlite.Connection | None = None
        # One connection per process; the lock keeps one coroutine's transaction from interleaving with another's.
        self._lock = asyncio.Lock()

    async def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        await self._db.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        await self._db.execute("PRAGMA journal_mode = WAL")
        await self._db.execute("PRAGMA foreign_keys = ON")
        await self._db.executescript(_SQLITE_SCHEMA)

    async def _close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @contextlib.asynccontextmanager
    async def _transaction(self, mode: Literal["DEFERRED", "IMMEDIATE"]) -> AsyncIterator[aiosqlite.Connection]:
        if self._db is None:
            raise ConversationStoreError("The SQLite conversation store is not started (call start() first).")
        db = self._db
        async with self._lock:
            await db.execute(f"BEGIN {mode}")
            try:
                yield db
            except BaseException:
                if db.in_transaction:
                    await db.execute("ROLLBACK")
                raise
            await db.execute("COMMIT")

    async def _get(self, conversation_id: str) -> Conversation | None:
        async with self._transaction("DEFERRED") as db:
            cursor = await db.execute(
                "SELECT system, created, updated FROM conversations WHERE id = ?", (conversation_id,)
            )
            row = await cursor.fetchone()
            if row is None:
                return None
            cursor = await db.execute(
                "SELECT role, content, created FROM conversation_turns WHERE conversation_id = ? ORDER BY seq",
                (conversation_id,),
            )
            turns = tuple(Turn(role, content, created) for role, content, created in await cursor.fetchall())
        system, created, updated = row
        return Conversation(conversation_id, system, created, updated, turns)

    async def _list(self, cutoff: float, limit: int) -> list[ConversationSummary]:
        async with self._transaction("DEFERRED") as db:
            cursor = await db.execute(
                "SELECT id, created, updated, turn_count FROM conversations WHERE updated >= ? "
                "ORDER BY updated DESC LIMIT ?",
                (cutoff, limit),
            )
            rows = await cursor.fetchall()
        return [ConversationSummary(*row) for row in rows]

    async def _append(
        self,
        conversation_id: str,
        system: str | None,
        turns: tuple[tuple[Role, str], ...],
        create: bool,
        now: float,
    ) -> bool:
        async with self._transaction("IMMEDIATE") as db:
            if create:
                await db.execute(
                    "INSERT INTO conversations (id, system, created, updated) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (id) DO NOTHING",
                    (conversation_id, system, now, now),
                )
            cursor = await db.execute(
                "UPDATE conversations SET turn_count = turn_count + ?, updated = ?, system = COALESCE(?, system) "
                "WHERE id = ? RETURNING turn_count",
                (len(turns), now, system, conversation_id),
            )
            row = await cursor.fetchone()
            if row is None:
                return False
            first_seq = row[0] - len(turns) + 1
            await db.executemany(
                "INSERT INTO conversation_turns (conversation_id, seq, role, content, created) VALUES (?, ?, ?, ?, ?)",
                [(conversation_id, first_seq + i, role, content, now) for i, (role, content) in enumerate(turns)],
            )
        return True

    async def _delete(self, conversation_id: str) -> float | None:
        async with self._transaction("IMMEDIATE") as db:
            cursor = await db.execute("DELETE FROM conversations WHERE id = ? RETURNING updated", (conversation_id,))
            row = await cursor.fetchone()
        return None if row is None else row[0]

    async def _purge(self, cutoff: float) -> int:
        async with self._transaction("IMMEDIATE") as db:
            cursor = await db.execute("DELETE FROM conversations WHERE updated < ?", (cutoff,))
        return cursor.rowcount


_POSTGRES_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    system TEXT,
    created DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
    turn_count INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS conversations_updated ON conversations (updated);
CREATE TABLE IF NOT EXISTS conversation_turns (
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (conversation_id, seq)
);
"""


class PostgresConversationStore(ConversationStore):
    backend = "PostgreSQL"
    driver_errors = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError)

    def __init__(
        self,
        dsn: str,
        ttl_s: float,
        purge_interval_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(ttl_s, purge_interval_s, clock)
        self._dsn = dsn
        self._pool: asyncpg.Pool | None = None

    async def _open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self._dsn, min_size=1, max_size=POSTGRES_POOL_SIZE, timeout=POSTGRES_CONNECT_TIMEOUT_S
        )
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", POSTGRES_SCHEMA_LOCK)
            await conn.execute(_POSTGRES_SCHEMA)

    async def _close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def _connections(self) -> asyncpg.Pool:
        if self._pool is None:
            raise ConversationStoreError("The PostgreSQL conversation store is not started (call start() first).")
        return self._pool

    async def _get(self, conversation_id: str) -> Conversation | None:
        async with self._connections.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            row = await conn.fetchrow(
                "SELECT system, created, updated FROM conversations WHERE id = $1", conversation_id
            )
            if row is None:
                return None
            turn_rows = await conn.fetch(
                "SELECT role, content, created FROM conversation_turns WHERE conversation_id = $1 ORDER BY seq",
                conversation_id,
            )
        turns = tuple(Turn(r["role"], r["content"], r["created"]) for r in turn_rows)
        return Conversation(conversation_id, row["system"], row["created"], row["updated"], turns)

    async def _list(self, cutoff: float, limit: int) -> list[ConversationSummary]:
        rows = await self._connections.fetch(
            "SELECT id, created, updated, turn_count FROM conversations WHERE updated >= $1 "
            "ORDER BY updated DESC LIMIT $2",
            cutoff,
            limit,
        )
        return [ConversationSummary(r["id"], r["created"], r["updated"], r["turn_count"]) for r in rows]

    async def _append(
        self,
        conversation_id: str,
        system: str | None,
        turns: tuple[tuple[Role, str], ...],
        create: bool,
        now: float,
    ) -> bool:
        async with self._connections.acquire() as conn, conn.transaction():
            if create:
                await conn.execute(
                    "INSERT INTO conversations (id, system, created, updated) VALUES ($1, $2, $3, $3) "
                    "ON CONFLICT (id) DO NOTHING",
                    conversation_id,
                    system,
                    now,
                )
            last_seq = await conn.fetchval(
                "UPDATE conversations SET turn_count = turn_count + $1, updated = $2, system = COALESCE($3, system) "
                "WHERE id = $4 RETURNING turn_count",
                len(turns),
                now,
                system,
                conversation_id,
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

    async def _delete(self, conversation_id: str) -> float | None:
        return await self._connections.fetchval(
            "DELETE FROM conversations WHERE id = $1 RETURNING updated", conversation_id
        )

    async def _purge(self, cutoff: float) -> int:
        status = await self._connections.execute("DELETE FROM conversations WHERE updated < $1", cutoff)
        return int(status.split()[-1])  # "DELETE <count>"


def build_store(settings: Settings) -> ConversationStore | None:
    """The store the settings ask for (not started yet), or None when CONVERSATIONS_ENABLED is false."""
    if not settings.CONVERSATIONS_ENABLED:
        return None
    if settings.CONVERSATIONS_DB_URL is None:
        return SQLiteConversationStore(settings.cache_dir / SQLITE_FILE_NAME, ttl_s=settings.CONVERSATIONS_TTL_S)
    dsn = settings.CONVERSATIONS_DB_URL.get_secret_value()
    if not dsn.startswith(("postgresql://", "postgres://")):
        raise ConfigError(
            "Invalid setting CONVERSATIONS_DB_URL: use postgresql://user:password@host:port/database, "
            "or leave it empty for the SQLite file in the cache directory."
        )
    return PostgresConversationStore(dsn, ttl_s=settings.CONVERSATIONS_TTL_S)
