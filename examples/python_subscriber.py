#!/usr/bin/env python3
"""Follow keywarden's keyring from Python, with redis-py and cryptography.

This is the sync protocol (README, "Sync protocol for any language") in a
few lines:

- the snapshot is the string key ``keywarden:keyring`` (the ``keyring
  export`` document); every key's ``wrapped`` field is a Fernet token made
  with the root key whose plaintext is the key material;
- ``keywarden:epoch`` is the newest epoch; events are published on the
  channel ``keywarden:events`` as JSON ``{epoch, action, kid, purpose,
  published_at}``;
- pub/sub is at-most-once, so poll the epoch too, and reload in full after
  every reconnect; never replace a keyring with an older epoch;
- acknowledge the epoch held in the hash ``keywarden:acks`` (field = your
  instance id, value = JSON ``{epoch, at}``) so keywarden can measure lag.

Usage::

    KEYWARDEN_ROOT_KEY=... python3 python_subscriber.py --redis-url redis://127.0.0.1:6379/0

It prints one JSON line per keyring loaded. With ``--until-epoch N`` it
stops once it holds epoch N or newer, then reads Fernet tokens from stdin
(one per line) and prints their decryption with the data keys
(MultiFernet: active first, then retiring).
"""

import argparse
import json
import os
import socket
import sys
import time
from datetime import datetime, timezone

import redis
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

CHANNEL = "keywarden:events"
EPOCH_KEY = "keywarden:epoch"
KEYRING_KEY = "keywarden:keyring"
ACKS_KEY = "keywarden:acks"
USABLE = ("active", "retiring")


def now_rfc3339():
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Keyring:
    """One snapshot, unwrapped: kid -> (entry, material bytes) for usable keys."""

    def __init__(self, doc, roots):
        self.epoch = doc["epoch"]
        self.entries = doc["keys"]
        self.material = {}
        root = MultiFernet([Fernet(k) for k in roots])
        for entry in self.entries:
            if entry["state"] in USABLE and entry.get("wrapped"):
                # Any Fernet library unwraps the material with the root key.
                self.material[entry["kid"]] = root.decrypt(entry["wrapped"].encode())

    def usable(self, purpose):
        keys = [e for e in self.entries if e["purpose"] == purpose and e["kid"] in self.material]
        keys.sort(key=lambda e: (e["state"] != "active", -e["version"]))
        return keys

    def data_fernet(self):
        """MultiFernet over the data keys: encrypts with the active one."""
        return MultiFernet([Fernet(self.material[e["kid"]]) for e in self.usable("data")])

    def active(self):
        return {e["purpose"]: e["kid"] for e in self.entries if e["state"] == "active"}


class Subscriber:
    def __init__(self, url, roots, instance_id, poll_interval):
        self.url, self.roots, self.instance_id = url, roots, instance_id
        self.poll_interval = poll_interval
        self.keyring = None
        self.held_at = None
        self.client = None
        self.pubsub = None

    def connect(self):
        self.client = redis.Redis.from_url(self.url, socket_timeout=3, socket_connect_timeout=2)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(CHANNEL)
        # After every (re)connect: a full reload, as messages may have been lost.
        self.reload(full=True)

    def reload(self, full=False):
        raw = self.client.get(KEYRING_KEY)
        if raw is None:
            return False
        doc = json.loads(raw)
        held = self.keyring.epoch if self.keyring else -1
        # Never go back to an older keyring (a Redis restored from a backup).
        if doc["epoch"] < held or (doc["epoch"] == held and not full):
            return False
        self.keyring = Keyring(doc, self.roots)
        if doc["epoch"] > held:
            self.held_at = now_rfc3339()
            print(json.dumps({"epoch": self.keyring.epoch, "active": self.keyring.active()}), flush=True)
        self.ack()
        return True

    def ack(self):
        ack = {"epoch": self.keyring.epoch, "at": self.held_at, "seen": now_rfc3339()}
        self.client.hset(ACKS_KEY, self.instance_id, json.dumps(ack))

    def step(self):
        """Waits up to one poll interval for an event, then checks the epoch."""
        message = self.pubsub.get_message(timeout=self.poll_interval)
        if message and message["type"] == "message":
            event = json.loads(message["data"])
            if event["epoch"] > self.keyring.epoch:
                self.reload()
        epoch = int(self.client.get(EPOCH_KEY) or 0)
        if epoch > self.keyring.epoch:
            self.reload()
        else:
            self.ack()

    def run(self, until_epoch=None, timeout=None):
        deadline = time.monotonic() + timeout if timeout else None
        while True:
            try:
                if self.client is None:
                    self.connect()
                if self.keyring and until_epoch is not None and self.keyring.epoch >= until_epoch:
                    return True
                self.step()
            except (redis.ConnectionError, redis.TimeoutError) as e:
                print(f"redis: {e}; reconnecting", file=sys.stderr, flush=True)
                self.client = None
                time.sleep(self.poll_interval)
            if deadline and time.monotonic() > deadline:
                return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default=os.environ.get("KEYWARDEN_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--root-key", default=os.environ.get("KEYWARDEN_ROOT_KEY", ""),
                        help="root key(s), comma-separated, newest first (default: $KEYWARDEN_ROOT_KEY)")
    parser.add_argument("--instance-id", default=f"py-{socket.gethostname()}-{os.getpid()}")
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--until-epoch", type=int)
    parser.add_argument("--timeout", type=float)
    args = parser.parse_args()
    roots = [k.strip() for k in args.root_key.split(",") if k.strip()]
    if not roots:
        parser.error("no root key: pass --root-key or set KEYWARDEN_ROOT_KEY")
    sub = Subscriber(args.redis_url, roots, args.instance_id, args.poll_interval)
    if not sub.run(args.until_epoch, args.timeout):
        print(f"timed out at epoch {sub.keyring.epoch if sub.keyring else None}", file=sys.stderr)
        sys.exit(1)
    if args.until_epoch is not None:
        fernet = sub.keyring.data_fernet()
        out = []
        for line in sys.stdin:
            token = line.strip()
            if token:
                try:
                    out.append(fernet.decrypt(token.encode()).decode())
                except InvalidToken:
                    out.append(None)
        print(json.dumps({"decrypted": out}), flush=True)


if __name__ == "__main__":
    main()
