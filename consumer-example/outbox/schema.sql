-- The order service's tables: its business rows and its outbox, written in one transaction.
CREATE TABLE IF NOT EXISTS shop_orders (
    id       uuid PRIMARY KEY,
    customer text NOT NULL,
    total    numeric(12, 2) NOT NULL,
    placed   timestamptz NOT NULL DEFAULT now()
);

-- The columns pgbridge reads by default (--outbox-table outbox).
CREATE TABLE IF NOT EXISTS outbox (
    id             uuid PRIMARY KEY,   -- the event id: Nats-Msg-Id, the consumer's dedup key
    aggregate_type text NOT NULL,      -- subject outbox.{aggregate_type}.{event_type}
    aggregate_id   text NOT NULL,      -- header Pgbridge-Aggregate-Id
    event_type     text NOT NULL,
    payload        jsonb NOT NULL,     -- the message body, as payload::text
    created        timestamptz NOT NULL DEFAULT now()
);
