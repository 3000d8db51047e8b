-- options: proto_version=1 messages=true
CREATE TABLE a (id int PRIMARY KEY);
CREATE TABLE b (id int PRIMARY KEY);
INSERT INTO a VALUES (1);
INSERT INTO b VALUES (1);
-- @workload
TRUNCATE a, b;
TRUNCATE a RESTART IDENTITY CASCADE;
