-- Re-encryption changes every row's kid, and every index that holds kid is
-- rewritten with it: on SQLite the (kid, id) index was about a third of the
-- engine's write cost; on PostgreSQL it also made every re-encryption
-- UPDATE non-HOT. Nothing reads secrets by kid on a hot path: the engine
-- walks the table by id, and the census (keys census, expire-keys, revoke)
-- counts every row anyway (for targets without a kid column it must), so it
-- now does so with one scan of the table.
DROP INDEX IF EXISTS secrets_by_kid;

-- With no index on kid or token, a re-encryption UPDATE can be HOT (the new
-- row version on the same page, no new index entries) when the page has
-- room for it. A pass rewrites every row of a page in one transaction, so
-- pages are kept half empty: twice the heap, for rewrites that add nothing
-- to the primary-key and name indexes (and leave them no bloat to vacuum)
-- and ran about 20% faster in bench/reencrypt_bench.py. It applies to pages
-- written from now on; `VACUUM FULL secrets` repacks an existing table.
ALTER TABLE secrets SET (fillfactor = 50);
