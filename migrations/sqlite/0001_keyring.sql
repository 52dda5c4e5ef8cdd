-- The keyring store. Key material appears only wrapped under the root key.
CREATE TABLE kw_meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE keys (
    kid            TEXT PRIMARY KEY,
    purpose        TEXT NOT NULL,
    algorithm      TEXT NOT NULL,
    state          TEXT NOT NULL,
    version        INTEGER NOT NULL,
    wrapped        TEXT,              -- Fernet token under the root key; NULL once destroyed
    root_kid       TEXT NOT NULL,
    row_mac        TEXT NOT NULL,     -- binds the wrapped token to this row
    created_at     INTEGER NOT NULL,  -- unix seconds
    activated_at   INTEGER,
    rotate_after   INTEGER,
    retire_after   INTEGER,
    revoked_at     INTEGER,
    revoked_reason TEXT,
    destroyed_at   INTEGER,
    UNIQUE (purpose, version)
);
-- Exactly one active key per purpose, enforced by the store itself.
CREATE UNIQUE INDEX keys_one_active_per_purpose ON keys (purpose) WHERE state = 'active';

CREATE TABLE secrets (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT NOT NULL UNIQUE,
    kid        TEXT NOT NULL,
    token      TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX secrets_by_kid ON secrets (kid, id);

-- Events to publish, written in the same transaction as the key change.
CREATE TABLE outbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    epoch        INTEGER NOT NULL,
    action       TEXT NOT NULL,
    kid          TEXT NOT NULL,
    purpose      TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    published_at INTEGER
);
CREATE INDEX outbox_unpublished ON outbox (published_at, id);
