-- The worker: one row per job run, and the leases that keep runs of one job
-- from overlapping across processes.
CREATE TABLE job_runs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    job          TEXT NOT NULL,
    origin       TEXT NOT NULL,       -- 'schedule' (a cron tick, also run --once) | 'manual' (job run)
    scheduled_at INTEGER NOT NULL,     -- unix seconds: the cron tick, or the start of a manual run
    worker_id    TEXT NOT NULL,
    started_at   INTEGER NOT NULL,     -- unix seconds
    finished_at  INTEGER,
    duration_ms  INTEGER,
    status       TEXT NOT NULL,       -- running | ok | failed | skipped
    error        TEXT,
    actions      TEXT NOT NULL,       -- JSON array of what the run did
    lease_token  INTEGER               -- the fencing token of the lease the run held
);
-- One run per tick of a job, however many workers: the claim is this insert.
CREATE UNIQUE INDEX job_runs_one_per_tick ON job_runs (job, scheduled_at) WHERE origin = 'schedule';
CREATE INDEX job_runs_by_job ON job_runs (job, id);
CREATE INDEX job_runs_running ON job_runs (status, job);

-- A lease per job name. Rows are never deleted, so the token only grows and
-- stays a valid fencing token.
CREATE TABLE leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    token      INTEGER NOT NULL,
    expires_at INTEGER NOT NULL       -- unix milliseconds on the database's clock
);
