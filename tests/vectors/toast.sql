-- options: proto_version=1 messages=true
CREATE TABLE t2 (id int PRIMARY KEY, small text, big text);
ALTER TABLE t2 ALTER COLUMN big SET STORAGE EXTERNAL;
-- @workload
INSERT INTO t2 VALUES (1, 's1', repeat('x', 3000));
UPDATE t2 SET small = 's2' WHERE id = 1;
ALTER TABLE t2 REPLICA IDENTITY FULL;
UPDATE t2 SET small = 's3' WHERE id = 1;
DELETE FROM t2 WHERE id = 1;
