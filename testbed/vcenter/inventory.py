"""A vCenter's persistent inventory in SQLite.

One file per vCenter (``inventory.db``), in WAL mode, written through one
connection under a lock (the API's worker threads and the service's event
loop share it). Structured columns are what queries need; the rest of a row
is JSON. Nothing here talks to a host: the inventory records what the
vCenter was told and saw, and ``service.reconcile`` compares it with what
the host agents report.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (name TEXT PRIMARY KEY, password_hash TEXT NOT NULL, role TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS revoked (sid TEXT PRIMARY KEY, expires_s REAL NOT NULL);
CREATE TABLE IF NOT EXISTS hosts (
    name TEXT PRIMARY KEY, address TEXT NOT NULL, cluster TEXT NOT NULL, state TEXT NOT NULL,
    license TEXT NOT NULL, host_key TEXT NOT NULL, facts TEXT NOT NULL, added_s REAL NOT NULL);
CREATE TABLE IF NOT EXISTS vms (
    name TEXT PRIMARY KEY, host TEXT NOT NULL, state TEXT NOT NULL, data TEXT NOT NULL,
    updated_s REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, target TEXT NOT NULL, state TEXT NOT NULL,
    data TEXT NOT NULL, started_s REAL NOT NULL, ended_s REAL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, t REAL NOT NULL, kind TEXT NOT NULL, vm TEXT, host TEXT,
    task TEXT, message TEXT NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trusts (
    name TEXT PRIMARY KEY, url TEXT NOT NULL, thumbprint TEXT NOT NULL, cert_pem TEXT NOT NULL,
    added_s REAL NOT NULL, how TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS source_copies (
    vm TEXT PRIMARY KEY, host TEXT NOT NULL, task TEXT NOT NULL, data TEXT NOT NULL, kept_s REAL NOT NULL);
CREATE TABLE IF NOT EXISTS admissions (
    id TEXT PRIMARY KEY, vm TEXT NOT NULL, host TEXT NOT NULL, peer TEXT NOT NULL, state TEXT NOT NULL,
    data TEXT NOT NULL, created_s REAL NOT NULL);
CREATE TABLE IF NOT EXISTS peer_nonces (
    nonce TEXT PRIMARY KEY, peer TEXT NOT NULL, expires_s REAL NOT NULL, seen_s REAL NOT NULL);
CREATE INDEX IF NOT EXISTS peer_nonces_expiry ON peer_nonces (expires_s);
"""


class Inventory:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self.db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction: everything inside commits together or not at all."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def query(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        with self._lock:
            return list(self.db.execute(sql, args))

    # --- meta ---------------------------------------------------------------------
    def meta(self, key: str, default: str | None = None) -> str | None:
        rows = self.query("SELECT value FROM meta WHERE key=?", key)
        return rows[0]["value"] if rows else default

    def set_meta(self, key: str, value: str) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, value))

    # --- users ----------------------------------------------------------------------
    def user(self, name: str) -> sqlite3.Row | None:
        rows = self.query("SELECT * FROM users WHERE name=?", name)
        return rows[0] if rows else None

    def put_user(self, name: str, password_hash: str, role: str) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO users VALUES (?,?,?)", (name, password_hash, role))

    def revoke(self, sid: str, expires_s: float) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO revoked VALUES (?,?)", (sid, expires_s))
            db.execute("DELETE FROM revoked WHERE expires_s < ?", (time.time(),))

    def revoked(self, sid: str) -> bool:
        return bool(self.query("SELECT 1 FROM revoked WHERE sid=?", sid))

    # --- nonces of signed peer calls: each accepted once, kept while a call carrying it could be accepted ---
    def use_nonce(self, nonce: str, peer: str, expires_s: float, now_s: float,
                  max_live: int) -> Literal["fresh", "seen", "full"]:
        """Record ``nonce`` (until ``expires_s``) unless it is already there (``seen``) or ``max_live`` nonces are
        (``full``); those past their expiry are dropped first, so the table holds one window's calls at most."""
        with self.tx() as db:
            db.execute("DELETE FROM peer_nonces WHERE expires_s < ?", (now_s,))
            if db.execute("SELECT 1 FROM peer_nonces WHERE nonce=?", (nonce,)).fetchone():
                return "seen"
            if db.execute("SELECT COUNT(*) FROM peer_nonces").fetchone()[0] >= max_live:
                return "full"
            db.execute("INSERT INTO peer_nonces VALUES (?,?,?,?)", (nonce, peer, expires_s, now_s))
            return "fresh"

    def live_nonces(self) -> int:
        return int(self.query("SELECT COUNT(*) AS n FROM peer_nonces")[0]["n"])

    # --- hosts ----------------------------------------------------------------------
    def hosts(self) -> list[dict[str, Any]]:
        return [_host(r) for r in self.query("SELECT * FROM hosts ORDER BY name")]

    def host(self, name: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM hosts WHERE name=?", name)
        return _host(rows[0]) if rows else None

    def put_host(self, h: dict[str, Any]) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO hosts VALUES (?,?,?,?,?,?,?,?)",
                       (h["name"], h["address"], h["cluster"], h["state"], h["license"], h["host_key"],
                        json.dumps(h["facts"]), h["added_s"]))

    def delete_host(self, name: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM hosts WHERE name=?", (name,))

    # --- VMs ------------------------------------------------------------------------
    def vms(self) -> list[dict[str, Any]]:
        return [_vm(r) for r in self.query("SELECT * FROM vms ORDER BY name")]

    def vm(self, name: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM vms WHERE name=?", name)
        return _vm(rows[0]) if rows else None

    def put_vm(self, vm: dict[str, Any]) -> None:
        data = {k: v for k, v in vm.items() if k not in ("name", "host", "state")}
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO vms VALUES (?,?,?,?,?)",
                       (vm["name"], vm["host"], vm["state"], json.dumps(data), time.time()))

    def delete_vm(self, name: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM vms WHERE name=?", (name,))

    # --- tasks ----------------------------------------------------------------------
    def put_task(self, t: dict[str, Any]) -> None:
        data = {k: v for k, v in t.items() if k not in ("id", "kind", "target", "state", "started_s", "ended_s")}
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO tasks VALUES (?,?,?,?,?,?,?)",
                       (t["id"], t["kind"], t["target"], t["state"], json.dumps(data), t["started_s"],
                        t.get("ended_s")))

    def task(self, tid: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM tasks WHERE id=?", tid)
        return _task(rows[0]) if rows else None

    def tasks(self, state: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        if state:
            rows = self.query("SELECT * FROM tasks WHERE state=? ORDER BY started_s DESC LIMIT ?", state, limit)
        else:
            rows = self.query("SELECT * FROM tasks ORDER BY started_s DESC LIMIT ?", limit)
        return [_task(r) for r in rows]

    # --- events ---------------------------------------------------------------------
    def event(self, kind: str, message: str, *, vm: str | None = None, host: str | None = None,
              task: str | None = None, **data: Any) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO events (t, kind, vm, host, task, message, data) VALUES (?,?,?,?,?,?,?)",
                       (time.time(), kind, vm, host, task, message, json.dumps(data)))

    def events(self, vm: str | None = None, since_id: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        if vm:
            rows = self.query("SELECT * FROM events WHERE vm=? AND id>? ORDER BY id LIMIT ?", vm, since_id, limit)
        else:
            rows = self.query("SELECT * FROM events WHERE id>? ORDER BY id LIMIT ?", since_id, limit)
        return [{**dict(r), "data": json.loads(r["data"])} for r in rows]

    # --- trust ----------------------------------------------------------------------
    def trusts(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.query("SELECT * FROM trusts ORDER BY name")]

    def trust(self, name: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM trusts WHERE name=?", name)
        return dict(rows[0]) if rows else None

    def put_trust(self, name: str, url: str, thumbprint: str, cert_pem: str, how: str) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO trusts VALUES (?,?,?,?,?,?)",
                       (name, url, thumbprint, cert_pem, time.time(), how))

    def delete_trust(self, name: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM trusts WHERE name=?", (name,))

    # --- admissions (VMs coming in from a peer vCenter) -----------------------------
    def put_admission(self, a: dict[str, Any]) -> None:
        data = {k: v for k, v in a.items() if k not in ("id", "vm", "host", "peer", "state", "created_s")}
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO admissions VALUES (?,?,?,?,?,?,?)",
                       (a["id"], a["vm"], a["host"], a["peer"], a["state"], json.dumps(data), a["created_s"]))

    def admission(self, aid: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM admissions WHERE id=?", aid)
        return _admission(rows[0]) if rows else None

    def admissions(self, state: str | None = None) -> list[dict[str, Any]]:
        rows = self.query("SELECT * FROM admissions WHERE state=?", state) if state else \
            self.query("SELECT * FROM admissions")
        return [_admission(r) for r in rows]


    # --- source copies: what a move that was not verified (or failed after the switchover) kept -----
    def put_source_copy(self, c: dict[str, Any]) -> None:
        data = {k: v for k, v in c.items() if k not in ("vm", "host", "task", "kept_s")}
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO source_copies VALUES (?,?,?,?,?)",
                       (c["vm"], c["host"], c["task"], json.dumps(data), c["kept_s"]))

    def source_copy(self, vm: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM source_copies WHERE vm=?", vm)
        return _source_copy(rows[0]) if rows else None

    def source_copies(self) -> list[dict[str, Any]]:
        return [_source_copy(r) for r in self.query("SELECT * FROM source_copies ORDER BY vm")]

    def delete_source_copy(self, vm: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM source_copies WHERE vm=?", (vm,))


def _source_copy(r: sqlite3.Row) -> dict[str, Any]:
    return {"vm": r["vm"], "host": r["host"], "task": r["task"], "kept_s": r["kept_s"], **json.loads(r["data"])}


def _host(r: sqlite3.Row) -> dict[str, Any]:
    return {**dict(r), "facts": json.loads(r["facts"])}


def _vm(r: sqlite3.Row) -> dict[str, Any]:
    return {"name": r["name"], "host": r["host"], "state": r["state"], **json.loads(r["data"]),
            "updated_s": r["updated_s"]}


def _task(r: sqlite3.Row) -> dict[str, Any]:
    return {"id": r["id"], "kind": r["kind"], "target": r["target"], "state": r["state"],
            "started_s": r["started_s"], "ended_s": r["ended_s"], **json.loads(r["data"])}


def _admission(r: sqlite3.Row) -> dict[str, Any]:
    return {"id": r["id"], "vm": r["vm"], "host": r["host"], "peer": r["peer"], "state": r["state"],
            "created_s": r["created_s"], **json.loads(r["data"])}
