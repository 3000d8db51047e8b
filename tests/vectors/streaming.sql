-- options: proto_version=2 messages=true streaming=on
CREATE TABLE s (id int PRIMARY KEY, payload text);
-- @workload
BEGIN;
INSERT INTO s SELECT g, repeat('p', 100) FROM generate_series(1, 400) g;
SAVEPOINT sp;
INSERT INTO s SELECT g, repeat('q', 100) FROM generate_series(401, 800) g;
ROLLBACK TO SAVEPOINT sp;
INSERT INTO s VALUES (801, 'after rollback');
COMMIT;
BEGIN;
INSERT INTO s SELECT g, repeat('r', 100) FROM generate_series(1001, 1400) g;
ROLLBACK;
