-- options: proto_version=1 messages=true
CREATE TABLE t (id int PRIMARY KEY, name text, big text, note text);
-- @workload
INSERT INTO t VALUES (1, 'a', NULL, 'x'), (2, 'b', 'c', NULL);
