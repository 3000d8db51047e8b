-- options: proto_version=1 messages=true
CREATE TABLE n (id int PRIMARY KEY, i int, t text, b bool, f float8, by bytea, arr int[], ts timestamptz);
-- @workload
INSERT INTO n (id) VALUES (1);
UPDATE n SET t = 'set', i = NULL WHERE id = 1;
