-- The audit trail: one row per event, hash-chained (src/audit/chain.rs).
-- seq is assigned by the writer as head + 1 inside the writing transaction
-- (never a database sequence: a rolled-back insert would leave a gap).
CREATE TABLE audit_log (
    seq       INTEGER PRIMARY KEY,
    at_ms     INTEGER NOT NULL,   -- unix milliseconds
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    target    TEXT,
    outcome   TEXT NOT NULL,
    details   TEXT NOT NULL,      -- JSON object, no floats
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
-- Only the time is indexed (retention, export --since): every index is paid
-- by every key operation's transaction, while filtering by action or target
-- is an occasional auditor's scan.
CREATE INDEX audit_log_by_time ON audit_log (at_ms, seq);

-- The row every audit writer updates first: on PostgreSQL its row lock
-- serialises writers so seq stays gap-free (SQLite's BEGIN IMMEDIATE
-- already does).
INSERT INTO kw_meta (name, value) VALUES ('audit_lock', '0') ON CONFLICT (name) DO NOTHING;
