#!/usr/bin/env python3
"""Mirror one PostgreSQL table, published by pgbridge, into a local SQLite file.

It follows the bootstrap rule of the pgbridge README:

1. read the table's schema from the KV bucket ``schemas`` and create the SQLite table;
2. request a snapshot (core NATS request on ``snapshot.request.{table}``), wait for its
   ``init.meta.{table}`` message and load its chunks ``init.snap.{table}.{id}.*`` in order;
   a meta with ``error`` means the snapshot failed, and the mirror stops with that error;
3. read the ``CDC`` stream filtered on ``cdc.{table}.*`` from ``cdc_stream_seq + 1`` and apply
   the changes whose ``commit_lsn >= lsn``, idempotently (upsert and delete by primary key).

The position (last applied stream sequence, snapshot LSN) is stored in the SQLite file in the
same transaction as the rows, so a restart continues where it stopped. When the stream no
longer holds the next sequence, a new snapshot is taken.

Usage::

    python mirror.py --nats nats://127.0.0.1:24222 --table users --db mirror.sqlite  # dev.sh
    python mirror.py --table users --db mirror.sqlite --until-idle 3   # stop when idle
    python mirror.py --table users --db mirror.sqlite --dump           # print the rows
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import sqlite3
import sys
import time
from typing import Any, Callable

import msgpack
import nats
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError

STATE_TABLE = "_mirror_state"
"""Table in the SQLite file holding the position of each mirrored table."""

CDC_STREAM = "CDC"
SCHEMA_BUCKET = "schemas"
REQUEST_TIMEOUT = 10.0
"""Seconds to wait for the reply to a snapshot request."""
SNAPSHOT_TIMEOUT = 600.0
"""Seconds to wait for a requested snapshot's meta message and chunks."""
SCHEMA_TIMEOUT = 60.0
"""Seconds to wait for the table's schema to appear in the KV bucket."""
CONNECT_ATTEMPTS = 10
"""Connection attempts to NATS, one a second, before the mirror gives up."""
COMMIT_EVERY = 500
"""Changes applied per SQLite transaction at most (a quiet stream commits at once)."""

# SQLite column types. The declared type decides SQLite's type affinity; BOOLEAN (numeric
# affinity) and JSON_TEXT (text affinity) are only names that tell --dump how to print.
INTEGER, REAL, BOOLEAN, BLOB, TEXT, JSON_TEXT = (
    "INTEGER", "REAL", "BOOLEAN", "BLOB", "TEXT", "JSON_TEXT",
)
INTEGER_TYPES = {"smallint", "integer", "bigint", "oid"}
REAL_TYPES = {"real", "double precision"}


def sqlite_type(data_type: str) -> str:
    """The SQLite column type for a PostgreSQL ``format_type`` name."""
    if data_type.endswith("]"):
        return JSON_TEXT
    if data_type in INTEGER_TYPES:
        return INTEGER
    if data_type in REAL_TYPES:
        return REAL
    if data_type == "boolean":
        return BOOLEAN
    if data_type == "bytea":
        return BLOB
    return TEXT


def parse_lsn(text: str) -> int:
    """PostgreSQL's ``X/X`` LSN text as a number, so LSNs compare correctly."""
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def quote(name: str) -> str:
    """An SQLite identifier, quoted."""
    return '"' + name.replace('"', '""') + '"'


class MessageError(Exception):
    """A message that is neither MessagePack nor JSON, or not a document."""


class Codec:
    """Decodes the bridge's messages. MessagePack (the default) and JSON are told apart per
    message, so a bridge switched between formats, or a stream holding both, needs no
    option: a JSON document starts with ``{``, a MessagePack map never does."""

    def decode(self, payload: bytes) -> Any:
        """One message payload as Python values."""
        try:
            if payload[:1] == b"{":
                value = json.loads(payload)
            else:
                value = msgpack.unpackb(payload, raw=False)
        except (ValueError, msgpack.UnpackException) as e:
            raise MessageError(
                f"a message of {len(payload)} bytes is neither MessagePack nor JSON ({describe(e)})"
            ) from None
        if not isinstance(value, dict):
            raise MessageError(f"a message holds a {type(value).__name__}, not a document")
        return value

    @staticmethod
    def to_sqlite(kind: str, value: Any) -> Any:
        """A decoded column value as it is stored in a column of SQLite type ``kind``."""
        if value is None:
            return None
        # JSON carries bytea as base64 and non-finite floats as strings; MessagePack has
        # bytes and floats, so these strings only come from JSON.
        if kind == BLOB and isinstance(value, str):
            return base64.b64decode(value)
        if kind == REAL and value in ("Infinity", "-Infinity"):
            return float(value)
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and math.isnan(value):
            return "NaN"  # SQLite would store a NaN float as NULL
        if isinstance(value, (list, dict)):
            return json.dumps(value, default=_json_default)
        return value


def _json_default(value: Any) -> Any:
    """JSON for values json cannot write itself (bytea elements of arrays: base64)."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


class Mirror:
    """The SQLite side: the mirrored table, its column types and the stored position."""

    def __init__(self, path: str, table: str):
        self.db = sqlite3.connect(path)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.table = table
        self.qtable = quote(table)
        self.kinds: dict[str, str] = {}
        self.key: list[str] = []
        self.db.execute(
            f"CREATE TABLE IF NOT EXISTS {STATE_TABLE} (table_token TEXT PRIMARY KEY, "
            "snapshot_id TEXT NOT NULL, lsn TEXT NOT NULL, last_seq INTEGER NOT NULL)"
        )
        self.db.commit()

    def apply_schema(self, schema: dict) -> None:
        """Creates the table from a ``schemas`` entry, or adds the columns it lacks."""
        key = list(schema["primary_key"])
        if not key:
            raise SystemExit(f"{self.table}: the table has no primary key, cannot mirror it")
        columns = sorted(schema["columns"], key=lambda c: c["position"])
        existing = {row[1] for row in self.db.execute(f"PRAGMA table_info({self.qtable})")}
        if not existing:
            defs = [f"{quote(c['name'])} {sqlite_type(c['data_type'])}" for c in columns]
            defs.append("PRIMARY KEY (" + ", ".join(quote(k) for k in key) + ")")
            self.db.execute(f"CREATE TABLE {self.qtable} ({', '.join(defs)})")
        else:
            for c in columns:
                if c["name"] not in existing:
                    self.db.execute(
                        f"ALTER TABLE {self.qtable} ADD COLUMN "
                        f"{quote(c['name'])} {sqlite_type(c['data_type'])}"
                    )
        self.db.commit()
        self.load_table()

    def load_table(self) -> None:
        """Reads the SQLite table's column types and primary key."""
        info = list(self.db.execute(f"PRAGMA table_info({self.qtable})"))
        if not info:
            raise SystemExit(f"{self.table}: no such table in the SQLite file")
        self.kinds = {row[1]: row[2] for row in info}
        self.key = [row[1] for row in sorted(info, key=lambda r: r[5]) if row[5] > 0]

    def position(self) -> tuple[str, int, int] | None:
        """(snapshot_id, snapshot LSN, last applied CDC sequence), or None before the first
        snapshot."""
        row = self.db.execute(
            f"SELECT snapshot_id, lsn, last_seq FROM {STATE_TABLE} WHERE table_token = ?",
            (self.table,),
        ).fetchone()
        return (row[0], parse_lsn(row[1]), row[2]) if row else None

    def save_position(self, snapshot_id: str, lsn: str, last_seq: int) -> None:
        """Records the position (the caller commits, together with the rows)."""
        self.db.execute(
            f"INSERT INTO {STATE_TABLE} VALUES (?, ?, ?, ?) ON CONFLICT (table_token) "
            "DO UPDATE SET snapshot_id = excluded.snapshot_id, lsn = excluded.lsn, "
            "last_seq = excluded.last_seq",
            (self.table, snapshot_id, lsn, last_seq),
        )

    def set_last_seq(self, last_seq: int) -> None:
        """Moves the stored CDC position (the caller commits)."""
        self.db.execute(
            f"UPDATE {STATE_TABLE} SET last_seq = ? WHERE table_token = ?",
            (last_seq, self.table),
        )

    def clear(self) -> None:
        """Deletes every row (snapshot start, TRUNCATE)."""
        self.db.execute(f"DELETE FROM {self.qtable}")

    def upsert(self, row: dict[str, Any]) -> None:
        """Inserts the row, or updates only the given columns of the row with its key."""
        names = list(row)
        cols = ", ".join(quote(n) for n in names)
        marks = ", ".join("?" for _ in names)
        keys = ", ".join(quote(k) for k in self.key)
        rest = [n for n in names if n not in self.key]
        action = (
            "DO UPDATE SET " + ", ".join(f"{quote(n)} = excluded.{quote(n)}" for n in rest)
            if rest
            else "DO NOTHING"
        )
        self.db.execute(
            f"INSERT INTO {self.qtable} ({cols}) VALUES ({marks}) ON CONFLICT ({keys}) {action}",
            list(row.values()),
        )

    def _where(self) -> str:
        return " AND ".join(f"{quote(k)} IS ?" for k in self.key)

    def delete(self, key: list[Any]) -> None:
        """Deletes the row with this key (no error when there is none)."""
        self.db.execute(f"DELETE FROM {self.qtable} WHERE {self._where()}", key)

    def move(self, old: list[Any], new: list[Any]) -> None:
        """Gives the row at ``old`` the key ``new`` (a primary-key change), keeping the
        columns the change does not send. Does nothing when there is no row at ``old``, e.g.
        when the change is applied a second time."""
        exists = self.db.execute(
            f"SELECT 1 FROM {self.qtable} WHERE {self._where()}", old
        ).fetchone()
        if exists:
            self.delete(new)
            sets = ", ".join(f"{quote(k)} = ?" for k in self.key)
            self.db.execute(
                f"UPDATE {self.qtable} SET {sets} WHERE {self._where()}", [*new, *old]
            )

    def dump(self, out: Callable[[str], None]) -> None:
        """Writes the rows as JSON lines, sorted by key: bytea as ``\\x`` hex, booleans as
        true/false, floats as numbers (NaN and infinities as strings)."""
        names = list(self.kinds)
        order = ", ".join(quote(k) for k in self.key)
        select = ", ".join(quote(n) for n in names)
        for values in self.db.execute(f"SELECT {select} FROM {self.qtable} ORDER BY {order}"):
            row = {}
            for name, value in zip(names, values):
                kind = self.kinds[name]
                if isinstance(value, bytes):
                    value = "\\x" + value.hex()
                elif kind == BOOLEAN and value is not None:
                    value = bool(value)
                elif isinstance(value, float) and math.isinf(value):
                    value = "Infinity" if value > 0 else "-Infinity"
                row[name] = value
            out(json.dumps(row, ensure_ascii=False))


class Bridge:
    """The NATS side: schema, snapshots and the change stream of one table."""

    def __init__(self, nc: nats.NATS, table: str, codec: Codec):
        self.nc = nc
        self.js = nc.jetstream()
        self.table = table
        self.codec = codec

    async def schema(self) -> dict:
        """The table's current entry in the ``schemas`` bucket (waits until it exists)."""
        key = self.table.replace("%", "=")
        deadline = time.monotonic() + SCHEMA_TIMEOUT
        while True:
            try:
                kv = await self.js.key_value(SCHEMA_BUCKET)
                entry = await kv.get(key)
                return self.codec.decode(entry.value)
            except (BucketNotFoundError, KeyNotFoundError, NotFoundError):
                if time.monotonic() > deadline:
                    raise SystemExit(f"no schema for {self.table!r} in bucket {SCHEMA_BUCKET}")
                await asyncio.sleep(0.5)

    async def request_snapshot(self) -> tuple[dict, Any]:
        """Requests a snapshot and waits for its meta message. Returns the meta and an
        ordered subscription to the snapshot's chunks."""
        meta_sub = await self.js.subscribe(
            f"init.meta.{self.table}", ordered_consumer=True, deliver_policy=DeliverPolicy.NEW
        )
        try:
            while True:
                reply = await self.nc.request(
                    f"snapshot.request.{self.table}", b"", timeout=REQUEST_TIMEOUT
                )
                answer = json.loads(reply.data)
                if answer.get("status") == "accepted":
                    break
                # in progress, just taken (cooldown) or busy: ask again later
                if answer.get("reason") not in ("in_progress", "cooldown", "busy"):
                    raise SystemExit(f"snapshot request refused: {answer.get('error')}")
                await asyncio.sleep(1)
            snapshot_id = answer["snapshot_id"]
            log(f"snapshot {snapshot_id} requested")
            deadline = time.monotonic() + SNAPSHOT_TIMEOUT
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SystemExit(
                        f"snapshot {snapshot_id} did not finish in {SNAPSHOT_TIMEOUT:.0f} s "
                        "(the bridge's log may say why, e.g. NATS unreachable)"
                    )
                try:
                    msg = await meta_sub.next_msg(timeout=left)
                except NatsTimeout:
                    continue
                meta = self.codec.decode(msg.data)
                if meta.get("snapshot_id") != snapshot_id:
                    continue  # another consumer's snapshot of the same table
                if "error" in meta:
                    # A failure document: the snapshot will not come, and waiting is useless.
                    raise SystemExit(
                        f"snapshot {snapshot_id} of {self.table} failed: {meta['error']}"
                    )
                break
        finally:
            await meta_sub.unsubscribe()
        chunks = await self.js.subscribe(
            f"init.snap.{self.table}.{snapshot_id}.*",
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )
        return meta, chunks

    async def stream_holds(self, seq: int) -> bool:
        """Whether the CDC stream still holds sequence ``seq`` (or has not reached it)."""
        state = (await self.js.stream_info(CDC_STREAM)).state
        return state.first_seq <= seq <= state.last_seq + 1

    async def changes(self, start_seq: int) -> Any:
        """An ordered subscription to the table's changes from stream sequence
        ``start_seq``."""
        return await self.js.subscribe(
            f"cdc.{self.table}.*",
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_seq
            ),
        )


def columns_of(pairs: list[dict] | None) -> dict[str, Any]:
    """A change event's ``[{name, value}]`` list as a dict."""
    return {c["name"]: c["value"] for c in pairs or []}


class Consumer:
    """Ties the two sides together: bootstrap, then follow the stream."""

    def __init__(self, mirror: Mirror, bridge: Bridge, codec: Codec, until_idle: float | None):
        self.mirror = mirror
        self.bridge = bridge
        self.codec = codec
        self.until_idle = until_idle
        self.counts = {"applied": 0, "skipped": 0, "unchanged_toast": 0}

    def row(self, values: dict[str, Any]) -> dict[str, Any]:
        """Column values as stored in SQLite."""
        return {
            name: self.codec.to_sqlite(self.mirror.kinds.get(name, TEXT), value)
            for name, value in values.items()
        }

    async def ensure_columns(self, names: list[str]) -> None:
        """Adds columns the mirror lacks (the table was altered) from the current schema."""
        if any(n not in self.mirror.kinds for n in names):
            self.mirror.apply_schema(await self.bridge.schema())

    async def snapshot(self) -> None:
        """Takes a new snapshot and loads it, replacing the table's rows and the position."""
        meta, chunks = await self.bridge.request_snapshot()
        try:
            self.mirror.clear()
            for expected in range(meta["batch_count"]):
                msg = await chunks.next_msg(timeout=SNAPSHOT_TIMEOUT)
                chunk = self.codec.decode(msg.data)
                if chunk["chunk"] != expected:
                    raise SystemExit(f"chunk {chunk['chunk']} came where {expected} was due")
                for values in chunk["data"]:
                    await self.ensure_columns(list(values))
                    self.mirror.upsert(self.row(values))
            self.mirror.save_position(meta["snapshot_id"], meta["lsn"], meta["cdc_stream_seq"])
            self.mirror.db.commit()
        except BaseException:
            self.mirror.db.rollback()
            raise
        finally:
            await chunks.unsubscribe()
        log(f"snapshot {meta['snapshot_id']}: {meta['row_count']} rows at {meta['lsn']}")

    async def apply(self, event: dict) -> None:
        """Applies one change event, idempotently."""
        op = event["operation"]
        key = self.mirror.key
        if op == "TRUNCATE":
            self.mirror.clear()
            return
        new = columns_of(event["columns"])
        await self.ensure_columns(list(new))
        if op == "DELETE":
            self.mirror.delete([self.row(new)[k] for k in key])
            return
        row = self.row(new)
        if op == "UPDATE" and event.get("old_columns"):
            old = self.row(columns_of(event["old_columns"]))
            old_key = [old[k] for k in key]
            new_key = [row[k] for k in key]
            if old_key != new_key:
                self.mirror.move(old_key, new_key)
        # Columns in unchanged_toast are absent from `columns`: the upsert leaves them as
        # they are.
        self.mirror.upsert(row)

    async def follow(self) -> bool:
        """Applies the table's changes after the stored position. Returns False when the
        stream no longer holds the next change (a new snapshot is needed), True when idle
        for ``until_idle`` seconds."""
        _, lsn, last_seq = self.mirror.position()
        if not await self.bridge.stream_holds(last_seq + 1):
            log(f"the CDC stream no longer holds sequence {last_seq + 1}")
            return False
        sub = await self.bridge.changes(last_seq + 1)
        pending = 0
        idle_since = time.monotonic()
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=0.2 if pending else 1.0)
                except NatsTimeout:
                    if pending:
                        self.mirror.db.commit()
                        pending = 0
                    if self.until_idle is not None and (
                        time.monotonic() - idle_since >= self.until_idle
                    ):
                        log(
                            "idle; changes applied {applied}, skipped as older than the "
                            "snapshot {skipped}, with unchanged TOAST {unchanged_toast}"
                            .format(**self.counts)
                        )
                        return True
                    continue
                idle_since = time.monotonic()
                seq = msg.metadata.sequence.stream
                event = self.codec.decode(msg.data)
                if "operation" not in event and ("op" in event or "payload" in event):
                    raise SystemExit(
                        "this is a change event in Debezium's envelope (the bridge runs with "
                        "--envelope debezium); mirror.py reads the bridge's native events "
                        "only: run the bridge with --envelope native"
                    )
                if parse_lsn(event["commit_lsn"]) >= lsn:
                    await self.apply(event)
                    self.counts["applied"] += 1
                    self.counts["unchanged_toast"] += bool(event.get("unchanged_toast"))
                else:
                    self.counts["skipped"] += 1
                self.mirror.set_last_seq(seq)
                pending += 1
                # A full batch is committed at the end of a source transaction (the change
                # marked last_in_tx; a bridge without the field marks none, so any change).
                if pending >= COMMIT_EVERY and event.get("last_in_tx", True):
                    self.mirror.db.commit()
                    pending = 0
        finally:
            if pending:
                self.mirror.db.commit()
            await sub.unsubscribe()

    async def run(self) -> None:
        """Bootstraps when needed, then follows the stream."""
        self.mirror.apply_schema(await self.bridge.schema())
        if self.mirror.position() is None:
            await self.snapshot()
        while not await self.follow():
            await self.snapshot()


def log(text: str) -> None:
    """A progress line on stderr."""
    print(f"mirror: {text}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nats", default="nats://127.0.0.1:4222", help="NATS server URL")
    p.add_argument(
        "--table",
        required=True,
        help="table token as in subjects: users, or sales.invoices outside public",
    )
    p.add_argument("--db", required=True, help="SQLite file (created when missing)")
    p.add_argument("--format", choices=["msgpack", "json"],
                   help="ignored: the format is told from each message (kept for old scripts)")
    p.add_argument("--until-idle", type=float, metavar="SECONDS",
                   help="exit after this many seconds without a new change")
    p.add_argument("--dump", action="store_true",
                   help="print the mirrored rows as JSON lines sorted by key and exit")
    return p.parse_args(argv)


async def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    args = parse_args(argv)
    mirror = Mirror(args.db, args.table)
    if args.dump:
        mirror.load_table()
        mirror.dump(print)
        return
    codec = Codec()
    try:
        # About 10 s of attempts, at start and after a lost connection, then one line.
        nc = await nats.connect(
            args.nats,
            connect_timeout=5,
            max_reconnect_attempts=CONNECT_ATTEMPTS,
            reconnect_time_wait=1,
            error_cb=_quiet,
        )
    except Exception as e:  # nats-py raises several types here, none of them useful alone
        raise Fatal(
            1, f"cannot connect to NATS at {args.nats} ({describe(e)}): is nats-server running, "
            "and is --nats right?"
        ) from None
    try:
        await Consumer(mirror, Bridge(nc, args.table, codec), codec, args.until_idle).run()
    finally:
        await nc.drain()
        mirror.db.close()


class Fatal(Exception):
    """Stops the mirror with one line on stderr and this exit code."""

    def __init__(self, code: int, text: str):
        super().__init__(text)
        self.code = code


async def _quiet(_error: Exception) -> None:
    """nats-py's error callback: connection errors end in one line from ``run``, not in
    logged tracebacks."""


def describe(e: BaseException) -> str:
    """An exception as a short phrase: its message, or its type when it has none."""
    return str(e) or type(e).__name__


def run(argv: list[str] | None = None) -> int:
    """Runs the mirror; the process exit code. Every fatal error ends in one line on stderr:
    1 for runtime failures, 2 for a missing stream or bucket (the bridge never ran), 0 after
    an interrupt."""
    try:
        asyncio.run(main(argv))
    except KeyboardInterrupt:
        return 0
    except Fatal as e:
        print(f"mirror: {e}", file=sys.stderr)
        return e.code
    except SystemExit:
        raise  # argparse and the mirror's own one-line stops
    except NotFoundError as e:
        print(
            f"mirror: stream or bucket not found ({describe(e)}): has the bridge run against "
            "this NATS server?",
            file=sys.stderr,
        )
        return 2
    except MessageError as e:
        print(f"mirror: {e}: is this stream written by pgbridge?", file=sys.stderr)
        return 1
    except sqlite3.Error as e:
        print(f"mirror: SQLite error: {describe(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # one line instead of a traceback, whatever went wrong
        print(f"mirror: {type(e).__name__}: {describe(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
