-- options: proto_version=4 messages=true streaming=parallel two_phase=true
CREATE TABLE sp (id int PRIMARY KEY, payload text);
-- @workload
BEGIN;
INSERT INTO sp SELECT g, repeat('p', 100) FROM generate_series(1, 400) g;
SAVEPOINT sp1;
INSERT INTO sp SELECT g, repeat('q', 100) FROM generate_series(401, 800) g;
ROLLBACK TO SAVEPOINT sp1;
INSERT INTO sp VALUES (801, 'after rollback');
COMMIT;
BEGIN;
INSERT INTO sp SELECT g, repeat('r', 100) FROM generate_series(1001, 1400) g;
ROLLBACK;
