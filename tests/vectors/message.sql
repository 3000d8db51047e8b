-- options: proto_version=1 messages=true
CREATE TABLE m (id int PRIMARY KEY);
-- @workload
BEGIN;
INSERT INTO m VALUES (1);
SELECT pg_logical_emit_message(true, 'pfx', 'hello');
COMMIT;
SELECT pg_logical_emit_message(false, 'pfx', 'nontx');
