-- Re-encryption: rows no known data key decrypts are recorded here (never
-- their token), left untouched, and skipped by later passes until an
-- operator clears them (`reencrypt --retry-quarantined`).
CREATE TABLE reencrypt_quarantine (
    target     TEXT NOT NULL,     -- `keywarden.secrets` or a [[reencrypt.targets]] name
    row_id     TEXT NOT NULL,     -- the row's id, as text
    kid        TEXT,              -- the row's kid column, when it has one
    reason     TEXT NOT NULL,
    first_seen BIGINT NOT NULL,  -- unix seconds
    last_seen  BIGINT NOT NULL,
    PRIMARY KEY (target, row_id)
);
