"""Storage for preference memory: SQLAlchemy (SQLite, PostgreSQL) or any LangGraph ``BaseStore``.

A backend offers one atomic operation, ``modify``: read a user's profile, compute the change, and
write the new profile with its history entry (and feedback row) all at once, or nothing.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

from sqlalchemy import (
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine

from cliper_integrations.core.memory.profile import MAX_USER_ID_LENGTH, PreferenceProfile


@dataclass
class Change:
    """What one ``modify`` writes: the new profile, why, and optionally a feedback event."""

    profile: PreferenceProfile
    action: str
    reason: str
    feedback: dict[str, Any] | None = None


Modifier = Callable[[PreferenceProfile], Change]


class MemoryBackend(Protocol):
    def read(self, user_id: str) -> PreferenceProfile | None: ...
    def read_json(self, user_id: str) -> str | None: ...
    def version(self, user_id: str) -> int: ...
    def modify(self, user_id: str, modifier: Modifier) -> Change: ...
    def history(self, user_id: str) -> list[dict[str, Any]]: ...
    def feedback(self, user_id: str) -> list[dict[str, Any]]: ...
    def forget(self, user_id: str) -> int: ...


def _now() -> datetime:
    return datetime.now(timezone.utc)


metadata = MetaData()
profiles = Table(
    "cliper_profiles",
    metadata,
    Column("user_id", String(MAX_USER_ID_LENGTH), primary_key=True),
    Column("profile", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
history = Table(
    "cliper_history",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("user_id", String(MAX_USER_ID_LENGTH), nullable=False, index=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("action", String(32), nullable=False),
    Column("before", Text, nullable=False),
    Column("after", Text, nullable=False),
    Column("reason", Text, nullable=False),
)
feedback_events = Table(
    "cliper_feedback",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("user_id", String(MAX_USER_ID_LENGTH), nullable=False, index=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("rating", Float, nullable=False),
    Column("response_text", Text, nullable=False),
    Column("style", Text, nullable=False),
)
_WRITE = "cliper_write"


def _configure_sqlite(engine: Engine) -> None:
    """WAL mode, a busy timeout, and ``BEGIN IMMEDIATE`` for writes so read-modify-write never races."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy, not pysqlite, issues BEGIN
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        write = connection.get_execution_options().get(_WRITE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


class SQLBackend:
    """Profiles, history and feedback in three tables, through SQLAlchemy (SQLite or PostgreSQL)."""

    def __init__(self, url: str) -> None:
        self.url = url
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 60}
        self.engine = create_engine(url, **kwargs)
        self.dialect = self.engine.dialect.name
        if self.dialect == "sqlite":
            _configure_sqlite(self.engine)
        metadata.create_all(self.engine)

    def read_json(self, user_id: str) -> str | None:
        with self.engine.connect() as connection:
            return connection.execute(
                select(profiles.c.profile).where(profiles.c.user_id == user_id)
            ).scalar_one_or_none()

    def version(self, user_id: str) -> int:
        """How many changes the stored profile has seen (0 for an unknown user)."""
        with self.engine.connect() as connection:
            found = connection.execute(select(profiles.c.version).where(profiles.c.user_id == user_id)).scalar()
            return found or 0

    def read(self, user_id: str) -> PreferenceProfile | None:
        stored = self.read_json(user_id)
        return None if stored is None else PreferenceProfile.model_validate_json(stored)

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self.engine.connect().execution_options(**{_WRITE: True}) as connection, connection.begin():
            yield connection

    def _insert_ignore(self, connection: Connection, user_id: str, now: datetime):
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        empty = PreferenceProfile().model_dump_json()
        connection.execute(
            insert(profiles).values(user_id=user_id, profile=empty, version=0, updated_at=now).on_conflict_do_nothing()
        )

    def modify(self, user_id: str, modifier: Modifier) -> Change:
        now = _now()
        with self._write() as connection:
            self._insert_ignore(connection, user_id, now)
            query = select(profiles.c.profile, profiles.c.version).where(profiles.c.user_id == user_id)
            if self.dialect == "postgresql":
                query = query.with_for_update()
            stored, version = connection.execute(query).one()
            before = PreferenceProfile.model_validate_json(stored)
            change = modifier(before)
            after = change.profile.model_dump_json()
            connection.execute(
                update(profiles)
                .where(profiles.c.user_id == user_id)
                .values(profile=after, version=version + 1, updated_at=now)
            )
            connection.execute(
                history.insert().values(
                    user_id=user_id, at=now, action=change.action, before=stored, after=after, reason=change.reason
                )
            )
            if change.feedback is not None:
                connection.execute(
                    feedback_events.insert().values(
                        user_id=user_id,
                        at=now,
                        rating=change.feedback["rating"],
                        response_text=change.feedback["response_text"],
                        style=json.dumps(change.feedback["style"]),
                    )
                )
        return change

    def history(self, user_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(history).where(history.c.user_id == user_id).order_by(history.c.id)
            ).mappings()
            return [
                {
                    "at": row["at"].isoformat(),
                    "action": row["action"],
                    "before": json.loads(row["before"]),
                    "after": json.loads(row["after"]),
                    "reason": row["reason"],
                }
                for row in rows
            ]

    def feedback(self, user_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(feedback_events).where(feedback_events.c.user_id == user_id).order_by(feedback_events.c.id)
            ).mappings()
            return [
                {
                    "at": row["at"].isoformat(),
                    "rating": row["rating"],
                    "response_text": row["response_text"],
                    "style": json.loads(row["style"]),
                }
                for row in rows
            ]

    def forget(self, user_id: str) -> int:
        with self._write() as connection:
            return sum(
                connection.execute(delete(table).where(table.c.user_id == user_id)).rowcount
                for table in (profiles, history, feedback_events)
            )


class LangGraphStoreBackend:
    """Keeps each user's data in a LangGraph ``BaseStore`` under ``("cliper", "users", user_id)``.

    A ``BaseStore`` has no transactions: ``modify`` is atomic among the threads of this process (one
    lock per user), not across processes sharing the store.
    """

    PAGE = 500

    def __init__(self, store: Any) -> None:
        self.store = store
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    @staticmethod
    def namespace(user_id: str) -> tuple[str, ...]:
        return ("cliper", "users", user_id)

    def _lock(self, user_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(user_id, threading.Lock())

    def read_json(self, user_id: str) -> str | None:
        item = self.store.get(self.namespace(user_id), "profile")
        return None if item is None else json.dumps(item.value["profile"])

    def read(self, user_id: str) -> PreferenceProfile | None:
        item = self.store.get(self.namespace(user_id), "profile")
        return None if item is None else PreferenceProfile.model_validate(item.value["profile"])

    def version(self, user_id: str) -> int:
        item = self.store.get(self.namespace(user_id), "profile")
        return 0 if item is None else int(item.value.get("version", 0))

    def modify(self, user_id: str, modifier: Modifier) -> Change:
        namespace = self.namespace(user_id)
        with self._lock(user_id):
            before = self.read(user_id) or PreferenceProfile()
            version = self.version(user_id)
            change = modifier(before)
            now = _now().isoformat()
            key = f"{now}-{uuid.uuid4().hex}"
            self.store.put(
                namespace,
                f"history/{key}",
                {
                    "at": now,
                    "action": change.action,
                    "before": before.model_dump(),
                    "after": change.profile.model_dump(),
                    "reason": change.reason,
                },
                index=False,
            )
            if change.feedback is not None:
                self.store.put(namespace, f"feedback/{key}", {"at": now, **change.feedback}, index=False)
            self.store.put(
                namespace, "profile", {"profile": change.profile.model_dump(), "version": version + 1}, index=False
            )
        return change

    def _own_items(self, user_id: str) -> list[Any]:
        """Every item stored in the user's own namespace (paged through ``search``)."""
        namespace = self.namespace(user_id)
        items, offset = [], 0
        while page := self.store.search(namespace, limit=self.PAGE, offset=offset):
            items.extend(page)
            offset += len(page)
        # search matches by prefix: items of longer namespaces below this one are not the user's own
        return [item for item in items if tuple(item.namespace) == namespace]

    def _items(self, user_id: str, prefix: str) -> list[dict[str, Any]]:
        mine = [item for item in self._own_items(user_id) if item.key.startswith(prefix)]
        return [item.value for item in sorted(mine, key=lambda item: item.key)]

    def history(self, user_id: str) -> list[dict[str, Any]]:
        return self._items(user_id, "history/")

    def feedback(self, user_id: str) -> list[dict[str, Any]]:
        return self._items(user_id, "feedback/")

    def forget(self, user_id: str) -> int:
        with self._lock(user_id):
            keys = [item.key for item in self._own_items(user_id)]
            for key in keys:
                self.store.delete(self.namespace(user_id), key)
            return len(keys)
