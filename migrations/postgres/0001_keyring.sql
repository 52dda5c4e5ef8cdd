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
    version        BIGINT NOT NULL,
    wrapped        TEXT,              -- Fernet token under the root key; NULL once destroyed
    root_kid       TEXT NOT NULL,
    row_mac        TEXT NOT NULL,     -- binds the wrapped token to this row
    created_at     BIGINT NOT NULL,   -- unix seconds
    activated_at   BIGINT,
    rotate_after   BIGINT,
    retire_after   BIGINT,
    revoked_at     BIGINT,
    revoked_reason TEXT,
    destroyed_at   BIGINT,
    UNIQUE (purpose, version)
);
-- Exactly one active key per purpose, enforced by the store itself.
CREATE UNIQUE INDEX keys_one_active_per_purpose ON keys (purpose) WHERE state = 'active';

CREATE TABLE secrets (
    id         BIGSERIAL PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    kid        TEXT NOT NULL,
    token      TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX secrets_by_kid ON secrets (kid, id);

-- Events to publish, written in the same transaction as the key change.
CREATE TABLE outbox (
    id           BIGSERIAL PRIMARY KEY,
    epoch        BIGINT NOT NULL,
    action       TEXT NOT NULL,
    kid          TEXT NOT NULL,
    purpose      TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    published_at BIGINT
);
CREATE INDEX outbox_unpublished ON outbox (published_at, id);
