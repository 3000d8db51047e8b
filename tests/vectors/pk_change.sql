-- options: proto_version=1 messages=true
CREATE TABLE p (a int, b text, v text, PRIMARY KEY (a, b));
INSERT INTO p VALUES (1, 'k', 'val');
-- @workload
UPDATE p SET a = 2 WHERE a = 1;
UPDATE p SET b = 'k2', v = 'val2' WHERE a = 2;
