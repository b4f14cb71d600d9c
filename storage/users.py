"""Users, roles, password hashes and the failed-login throttle.

Passwords are stored only as a memory-hard hash: ``hashlib.scrypt`` with a random 16-byte salt; the
parameters travel inside the stored string (``scrypt$n=16384,r=8,p=1$<salt b64>$<hash b64>``), so
they can be raised later without breaking old hashes. Nothing here logs or stores a password.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

import duckdb

from core.errors import UsageError
from storage.db import fetch_all, scalar

log = logging.getLogger(__name__)

ROLES = ("admin", "annotator")
"""Roles, least to most privileged is annotator < admin (an admin may do everything an annotator may)."""
ROLE_RANK = {"annotator": 1, "admin": 2}

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MIN_PASSWORD_LEN = 8

SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_DKLEN = 2**14, 8, 1, 32

THROTTLE_FREE_FAILURES = 3
"""Failed logins per user name allowed without delay."""
THROTTLE_BASE_S = 2.0
"""Delay after the first failure past the free ones (the 4th); doubles with each further failure."""
THROTTLE_MAX_S = 15 * 60.0
"""Longest delay between attempts."""


# ------------------------------------------------------------------------------------ password hashing

def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """A new salted scrypt hash string of ``password`` (parameters inside the string)."""
    salt = os.urandom(16)
    dk = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=SCRYPT_DKLEN,
                        maxmem=256 * 1024 * 1024)
    return f"scrypt$n={n},r={r},p={p}${_b64(salt)}${_b64(dk)}"


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches the stored hash string (constant-time compare)."""
    try:
        algo, params, salt_b64, dk_b64 = stored.split("$")
        if algo != "scrypt":
            return False
        kv = dict(item.split("=") for item in params.split(","))
        salt, want = base64.b64decode(salt_b64), base64.b64decode(dk_b64)
        got = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=int(kv["n"]), r=int(kv["r"]), p=int(kv["p"]),
                             dklen=len(want), maxmem=256 * 1024 * 1024)
    except (ValueError, KeyError):
        return False
    return hmac.compare_digest(got, want)


@functools.lru_cache(maxsize=1)
def _dummy_hash() -> str:
    return hash_password("not-a-real-password")


def burn_time(password: str) -> None:
    """Spend the time of one verification (a login with an unknown name must not answer faster)."""
    verify_password(password, _dummy_hash())


# ------------------------------------------------------------------------------------ validation

def check_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise UsageError(f"invalid user name {name!r}: use 1-64 letters, digits, '_', '.', '@' or '-', "
                         "starting with a letter or digit")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise UsageError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    return role


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LEN:
        raise UsageError(f"the password is too short: use at least {MIN_PASSWORD_LEN} characters")
    return password


def role_allows(role: str | None, needed: str) -> bool:
    """True when a user of ``role`` may do what needs ``needed`` (admin includes annotator)."""
    return role is not None and ROLE_RANK.get(role, 0) >= ROLE_RANK[needed]


# ------------------------------------------------------------------------------------ users table

@dataclass(frozen=True)
class User:
    name: str
    role: str


def add_user(cur: duckdb.DuckDBPyConnection, name: str, role: str, password: str) -> User:
    check_name(name)
    check_role(role)
    check_password(password)
    if get_user(cur, name) is not None:
        raise UsageError(f"user {name!r} already exists; change the password with `prefloop users passwd {name}`")
    cur.execute("INSERT INTO users (name, role, password_hash) VALUES (?, ?, ?)", [name, role, hash_password(password)])
    return User(name, role)


def set_password(cur: duckdb.DuckDBPyConnection, name: str, password: str) -> None:
    check_password(password)
    _require(cur, name)
    cur.execute("UPDATE users SET password_hash = ? WHERE name = ?", [hash_password(password), name])


def set_role(cur: duckdb.DuckDBPyConnection, name: str, role: str) -> None:
    check_role(role)
    _require(cur, name)
    cur.execute("UPDATE users SET role = ? WHERE name = ?", [role, name])


def remove_user(cur: duckdb.DuckDBPyConnection, name: str) -> None:
    _require(cur, name)
    cur.execute("DELETE FROM users WHERE name = ?", [name])


def _require(cur: duckdb.DuckDBPyConnection, name: str) -> None:
    if get_user(cur, name) is None:
        raise UsageError(f"no user named {name!r}; `prefloop users list` shows who exists")


def get_user(cur: duckdb.DuckDBPyConnection, name: str | None) -> User | None:
    if not name:
        return None
    row = cur.execute("SELECT name, role FROM users WHERE name = ?", [name]).fetchone()
    return None if row is None else User(row[0], row[1])


def password_hash(cur: duckdb.DuckDBPyConnection, name: str) -> str | None:
    return scalar(cur, "SELECT password_hash FROM users WHERE name = ?", [name])


def list_users(cur: duckdb.DuckDBPyConnection) -> list[dict]:
    """Users (name, role, created_at) without their hashes, admins first."""
    return fetch_all(cur, "SELECT name, role, created_at FROM users ORDER BY role, name")


def count_users(cur: duckdb.DuckDBPyConnection, role: str | None = None) -> int:
    return scalar(cur, "SELECT count(*) FROM users WHERE (? IS NULL OR role = ?)", [role, role])


# ------------------------------------------------------------------------------------ login throttle

def throttle_delay(failures: int) -> float:
    """Seconds a user name must wait after ``failures`` consecutive failed logins (0 for the first few)."""
    over = failures - THROTTLE_FREE_FAILURES
    if over <= 0:
        return 0.0
    return min(THROTTLE_BASE_S * (2.0 ** (over - 1)), THROTTLE_MAX_S)


def login_locked_until(cur: duckdb.DuckDBPyConnection, name: str) -> datetime | None:
    """When the name may try again (None: it may try now, or never failed)."""
    return scalar(cur, "SELECT locked_until FROM login_throttle WHERE name = ?", [name])


def record_login_failure(cur: duckdb.DuckDBPyConnection, name: str, now: datetime) -> dict:
    """Count one failed login for ``name``; returns {failures, locked_until}."""
    failures = cur.execute(
        """INSERT INTO login_throttle (name, failures, last_failure_at) VALUES (?, 1, ?)
           ON CONFLICT (name) DO UPDATE SET failures = login_throttle.failures + 1,
                                            last_failure_at = excluded.last_failure_at
           RETURNING failures""", [name, now]).fetchone()[0]
    delay = throttle_delay(failures)
    locked = now + timedelta(seconds=delay) if delay > 0 else None
    cur.execute("UPDATE login_throttle SET locked_until = ? WHERE name = ?", [locked, name])
    return {"failures": failures, "locked_until": locked}


def clear_login_failures(cur: duckdb.DuckDBPyConnection, name: str) -> None:
    cur.execute("DELETE FROM login_throttle WHERE name = ?", [name])
