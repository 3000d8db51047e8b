"""A shipping service consuming OrderPlaced events from stream OUTBOX, each exactly once.

JetStream delivers at least once (a redelivery after a crash, a replay), so the consumer
remembers the id of every event it processed (the Nats-Msg-Id, the outbox row's id) in the
same SQLite transaction as the work it does, and skips an id it has seen. It acknowledges a
message only after that transaction committed."""

import argparse
import asyncio
import json
import sqlite3
import sys

import nats
from nats.js.api import ConsumerConfig, DeliverPolicy, AckPolicy
from nats.errors import TimeoutError as NatsTimeout

SUBJECT = "outbox.order.OrderPlaced"


def open_db(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE IF NOT EXISTS processed (event_id TEXT PRIMARY KEY)")
    db.execute("CREATE TABLE IF NOT EXISTS shipments (order_id TEXT PRIMARY KEY, "
               "customer TEXT NOT NULL, event_id TEXT NOT NULL)")
    return db


def process(db: sqlite3.Connection, event_id: str, body: bytes) -> bool:
    """Applies one event unless its id was processed before; True when it was applied."""
    event = json.loads(body)
    db.execute("BEGIN IMMEDIATE")
    try:
        seen = db.execute("INSERT OR IGNORE INTO processed VALUES (?)", (event_id,)).rowcount == 0
        if not seen:
            db.execute("INSERT INTO shipments VALUES (?, ?, ?)",
                       (event["order_id"], event["customer"], event_id))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return not seen


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--nats", default="nats://127.0.0.1:4222", help="NATS server")
    p.add_argument("--db", default="shipping.sqlite", help="the service's SQLite file")
    p.add_argument("--durable", default="shipping",
                   help="durable consumer name: a restart continues where it stopped")
    p.add_argument("--replay", action="store_true",
                   help="read the whole stream again with a new consumer (shows that every "
                        "event is skipped as already processed)")
    p.add_argument("--until-idle", type=float, default=0,
                   help="exit after this many seconds without a new event (0: run forever)")
    args = p.parse_args()

    db = open_db(args.db)
    nc = await nats.connect(args.nats)
    js = nc.jetstream()
    config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT)
    durable = None if args.replay else args.durable
    sub = await js.pull_subscribe(SUBJECT, durable=durable, stream="OUTBOX", config=config)
    applied = skipped = 0
    idle = 0.0
    try:
        while args.until_idle == 0 or idle < args.until_idle:
            try:
                msgs = await sub.fetch(100, timeout=1)
            # nats-py raises either, depending on where the wait ran out.
            except (NatsTimeout, asyncio.TimeoutError):
                idle += 1
                continue
            idle = 0.0
            for msg in msgs:
                event_id = msg.headers.get("Nats-Msg-Id") if msg.headers else None
                if not event_id:
                    print(f"skipping a message without Nats-Msg-Id on {msg.subject}", file=sys.stderr)
                elif process(db, event_id, msg.data):
                    applied += 1
                    print(f"shipping order of event {event_id}", file=sys.stderr)
                else:
                    skipped += 1
                await msg.ack()
    finally:
        # Every processed message was acknowledged above; nothing is left to drain.
        await nc.close()
        total = db.execute("SELECT count(*) FROM shipments").fetchone()[0]
        db.close()
        print(json.dumps({"applied": applied, "skipped": skipped, "shipments": total}))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except KeyboardInterrupt:
        sys.exit(0)
