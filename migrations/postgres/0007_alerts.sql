-- Alerts: rule state (so a restarted worker does not re-send), every
-- delivery outcome (status 'dead_letter' = given up after the retry bound,
-- the payload kept for replay), and event-raised alerts (which also feed
-- figures such as the rotation success rate).
CREATE TABLE alert_state (
    rule          TEXT PRIMARY KEY,
    status        TEXT NOT NULL,      -- ok | firing
    since         BIGINT,            -- unix seconds: when the current firing began
    last_notified BIGINT,
    escalated     BIGINT NOT NULL DEFAULT 0,
    last_value    DOUBLE PRECISION,
    last_fired    BIGINT,
    updated_at    BIGINT NOT NULL
);

CREATE TABLE alert_deliveries (
    id              BIGSERIAL PRIMARY KEY,
    notification_id TEXT NOT NULL,
    rule            TEXT NOT NULL,
    kind            TEXT NOT NULL,     -- firing | reminder | escalation | resolved | event | test
    severity        TEXT NOT NULL,
    channel         TEXT NOT NULL,     -- email | slack | webhook
    status          TEXT NOT NULL,     -- delivered | dead_letter
    attempts        BIGINT NOT NULL,
    last_error      TEXT,
    payload         TEXT NOT NULL,     -- the notification as JSON (never a secret)
    created_at      BIGINT NOT NULL,
    finished_at     BIGINT NOT NULL
);
CREATE INDEX alert_deliveries_recent ON alert_deliveries (id);

CREATE TABLE alert_events (
    id      BIGSERIAL PRIMARY KEY,
    name    TEXT NOT NULL,             -- rotation_failed | key_revoked | row_quarantined | ...
    subject TEXT NOT NULL,
    summary TEXT NOT NULL,
    at      BIGINT NOT NULL
);
CREATE INDEX alert_events_by_name ON alert_events (name, at);
