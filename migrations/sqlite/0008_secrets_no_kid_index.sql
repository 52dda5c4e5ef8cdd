-- Re-encryption changes every row's kid, and every index that holds kid is
-- rewritten with it: on SQLite the (kid, id) index was about a third of the
-- engine's write cost; on PostgreSQL it also made every re-encryption
-- UPDATE non-HOT. Nothing reads secrets by kid on a hot path: the engine
-- walks the table by id, and the census (keys census, expire-keys, revoke)
-- counts every row anyway (for targets without a kid column it must), so it
-- now does so with one scan of the table.
DROP INDEX IF EXISTS secrets_by_kid;
