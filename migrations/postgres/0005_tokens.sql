-- Revoked tokens (by jti) until their own expiry, and keywarden's API keys.
CREATE TABLE token_denylist (
    jti        TEXT PRIMARY KEY,
    kid        TEXT NOT NULL,
    expires_at BIGINT NOT NULL,   -- the token's exp: the entry is pruned after it
    revoked_at BIGINT NOT NULL
);
CREATE INDEX token_denylist_expiry ON token_denylist (expires_at);

CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,  -- the non-secret prefix shown in listings
    hash         TEXT NOT NULL,     -- SHA-256 of the whole key; the key itself is never stored
    name         TEXT NOT NULL,
    scopes       TEXT NOT NULL,     -- comma-separated
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT,
    revoked_at   BIGINT,
    last_used_at BIGINT
);
