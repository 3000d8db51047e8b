-- options: proto_version=3 messages=true streaming=on two_phase=true
CREATE TABLE tp (id int PRIMARY KEY, payload text);
-- @workload
BEGIN;
INSERT INTO tp VALUES (1, 'one');
INSERT INTO tp VALUES (2, 'two');
PREPARE TRANSACTION 'tp_commit';
INSERT INTO tp VALUES (3, 'between');
COMMIT PREPARED 'tp_commit';
BEGIN;
INSERT INTO tp VALUES (4, 'rolled back');
PREPARE TRANSACTION 'tp_rollback';
ROLLBACK PREPARED 'tp_rollback';
BEGIN;
INSERT INTO tp SELECT g, repeat('p', 100) FROM generate_series(100, 499) g;
SAVEPOINT sp;
INSERT INTO tp SELECT g, repeat('q', 100) FROM generate_series(500, 899) g;
ROLLBACK TO SAVEPOINT sp;
INSERT INTO tp VALUES (900, 'after rollback');
PREPARE TRANSACTION 'tp_streamed';
COMMIT PREPARED 'tp_streamed';
