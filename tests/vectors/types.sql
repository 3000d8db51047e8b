-- options: proto_version=1 messages=true
CREATE TYPE mood AS ENUM ('sad', 'happy');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TABLE ty (
  id int PRIMARY KEY,
  i2 smallint, i4 integer, i8 bigint, o oid,
  f4 real, f8 double precision,
  b bool, by bytea, tx text, vc varchar(20), ch char(3),
  nu numeric, d date, tm time, tt timetz, ts timestamp, tz timestamptz, iv interval,
  u uuid, j json, jb jsonb,
  ai4 int[], ai8 bigint[], ai2 smallint[], af8 float8[], af4 real[], ab bool[], aby bytea[], atx text[], avc varchar[],
  a2d int[], anu numeric[],
  mo mood, pi posint
);
-- @workload
INSERT INTO ty VALUES (1,
  -32768, -2147483648, -9223372036854775808, 0,
  'NaN', '-Infinity',
  true, '\x00', 'plain', 'v', 'ab',
  '0', '2025-12-10', '00:00:00', '10:30:00+02', '2025-12-10 10:30:00.123456', '2025-12-10 10:30:00.123456+00', '1 year 2 mons 3 days 04:05:06.789',
  '00000000-0000-0000-0000-000000000000', '{"a": [1, 2]}', '{"b": null, "a": 1}',
  '{}', '{9223372036854775807,-9223372036854775808}', '{1,NULL,3}', '{NaN,Infinity,-Infinity,1.5}', '{0.1}', '{t,f,NULL}', '{"\\x00ff",NULL}', '{"a,b","c\"d",NULL,"NULL","",é}', '{x,"y z"}',
  '{{1,2},{3,4}}', '{1.10,NaN}',
  'happy', 7);
INSERT INTO ty VALUES (2,
  32767, 2147483647, 9223372036854775807, 4294967295,
  'Infinity', 1.7976931348623157e308,
  false, '\x000102ff00', 'héllo ✓ 😀 "quoted" back\slash', '', '   ',
  '-123456789012345678901234567890.123456789', '0001-01-01 BC', '24:00:00', '23:59:59.999999-12', 'infinity', '-infinity', '-1 days -00:00:01',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '[]', '{}',
  '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}',
  '{}', '{}',
  'sad', 2147483647);
INSERT INTO ty VALUES (3,
  0, 0, 0, 1,
  0.1, 5e-324,
  NULL, '\x', '', NULL, NULL,
  'NaN', NULL, NULL, NULL, NULL, '1970-01-01 00:00:00+00', '0', NULL, 'null', '"s"',
  '{NULL}', NULL, NULL, '{-0}', NULL, NULL, '{"\\x"}', '{"\\\\"}', '{NULL,null}',
  '{{NULL}}', NULL, NULL, NULL);
