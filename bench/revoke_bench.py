#!/usr/bin/env python3
"""revoke_bench.py -- time from `keywarden revoke` to zero rows under the revoked key.

Seeds N secrets (200-byte values) in a fresh store (SQLite, or a fresh
PostgreSQL database with --pg-admin), then runs
`keywarden revoke <active data kid> --reason bench --yes --json` and reports
the wall time of the command, the time of each step (from its report) and
the rows moved. The census in the report proves zero rows remain.

Usage (from the repository root, after `cargo build`):
  python3 bench/revoke_bench.py [--rows 100000] [--bin target/debug/keywarden]
      [--pg-admin postgres://postgres@127.0.0.1:55432/postgres]
Prints one JSON document on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, env, cwd):
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def pg_db(admin: str, create: bool, name: str) -> str:
    sql = f"CREATE DATABASE {name}" if create else f"DROP DATABASE IF EXISTS {name}"
    subprocess.run(["psql", admin, "-qc", sql], check=True, capture_output=True)
    return admin.rsplit("/", 1)[0] + "/" + name


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "debug", "keywarden"))
    ap.add_argument("--pg-admin")
    a = ap.parse_args()
    a.bin = os.path.abspath(a.bin)  # commands run in a temporary directory
    with tempfile.TemporaryDirectory() as d:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYWARDEN_")}
        env["KEYWARDEN_DATA_DIR"] = os.path.join(d, "data")
        env["KEYWARDEN_LOG"] = "warn"
        db = None
        if a.pg_admin:
            db = "kw_revoke_bench_" + uuid.uuid4().hex[:8]
            env["KEYWARDEN_DATABASE_URL"] = pg_db(a.pg_admin, True, db)
        try:
            run([a.bin, "init"], env, d)
            path = os.path.join(d, "seed.jsonl")
            with open(path, "w") as f:
                for i in range(a.rows):
                    f.write(json.dumps({"name": f"s/{i}", "value": f"{i:08}-" + "x" * 191}) + "\n")
            run([a.bin, "secrets", "import", path], env, d)
            keys = json.loads(run([a.bin, "keys", "list", "--json"], env, d).stdout)
            kid = next(k["kid"] for k in keys if k["purpose"] == "data" and k["state"] == "active")
            t = time.monotonic()
            p = run([a.bin, "revoke", kid, "--reason", "bench", "--yes", "--json"], env, d)
            wall = time.monotonic() - t
            r = json.loads(p.stdout)
            print(json.dumps({
                "backend": "postgres" if db else "sqlite",
                "rows": a.rows,
                "seconds_revoke_to_zero_rows": round(wall, 3),
                "rows_moved": r["rows_moved"],
                "rows_remaining": r["rows_remaining"],
                "complete": r["complete"],
                "steps": {s["step"]: round(s["seconds"], 3) for s in r["steps"]},
            }, indent=2))
        finally:
            if db:
                pg_db(a.pg_admin, False, db)


if __name__ == "__main__":
    sys.exit(main())
