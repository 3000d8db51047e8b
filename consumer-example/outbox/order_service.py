"""An order service using the transactional outbox: each order and its OrderPlaced event are
written in one PostgreSQL transaction, so the event exists exactly when the order does.
pgbridge publishes the event to NATS after the commit; nothing here talks to NATS."""

import argparse
import asyncio
import json
import random
import sys
import uuid

import asyncpg


async def place_order(conn: asyncpg.Connection, customer: str, total: float) -> uuid.UUID:
    order_id = uuid.uuid4()
    event = {"order_id": str(order_id), "customer": customer, "total": f"{total:.2f}"}
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO shop_orders (id, customer, total) VALUES ($1, $2, $3)",
            order_id, customer, total)
        await conn.execute(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) "
            "VALUES ($1, 'order', $2, 'OrderPlaced', $3::jsonb)",
            uuid.uuid4(), str(order_id), json.dumps(event))
    return order_id


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--pg", default="postgresql://postgres:dev_superuser@127.0.0.1:25432/app",
                   help="PostgreSQL URL of the service's database")
    p.add_argument("--orders", type=int, default=10, help="orders to place")
    p.add_argument("--schema", action="store_true", help="create the tables first (schema.sql)")
    args = p.parse_args()
    conn = await asyncpg.connect(args.pg)
    try:
        if args.schema:
            with open(__file__.rsplit("/", 1)[0] + "/schema.sql", encoding="utf-8") as f:
                await conn.execute(f.read())
        for i in range(args.orders):
            order_id = await place_order(conn, f"customer-{i % 5}", random.uniform(5, 500))
            print(f"placed order {order_id}", file=sys.stderr)
    finally:
        await conn.close()
    print(json.dumps({"placed": args.orders}))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
