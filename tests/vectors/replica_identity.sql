-- options: proto_version=1 messages=true
CREATE TABLE d (id int PRIMARY KEY, v text, w int);
CREATE TABLE f (id int PRIMARY KEY, v text, w int);
ALTER TABLE f REPLICA IDENTITY FULL;
INSERT INTO d VALUES (1, 'one', 10), (2, 'two', 20);
INSERT INTO f VALUES (1, 'one', 10), (2, 'two', 20);
-- @workload
UPDATE d SET v = 'uno' WHERE id = 1;
UPDATE f SET v = 'uno' WHERE id = 1;
DELETE FROM d WHERE id = 2;
DELETE FROM f WHERE id = 2;
