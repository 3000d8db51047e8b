-- options: proto_version=3 messages=true streaming=on two_phase=true
CREATE TABLE tps (id int PRIMARY KEY, payload text);
-- @workload
BEGIN;
INSERT INTO tps SELECT g, repeat('p', 100) FROM generate_series(1, 400) g;
PREPARE TRANSACTION 'tps_streamed';
INSERT INTO tps VALUES (1000, 'committed while the streamed one waits');
COMMIT PREPARED 'tps_streamed';
