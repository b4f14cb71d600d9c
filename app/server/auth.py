"""Login against the users table, the failed-login throttle, and the role check every handler makes.

Gradio's login form calls ``Authenticator.check`` (``launch(auth=...)``). After a few failures a user
name must wait (exponentially longer) before the next attempt counts, even with the right password;
the state lives in the database (``login_throttle``). Every failure is in the audit log, without the
password. Handlers never trust the browser: each one calls ``require(ctx, username, role)`` with
``gr.Request.username`` (None for an unauthenticated call), so hiding a button is never the only guard.
"""

from __future__ import annotations

import asyncio
import logging
import math

import duckdb
import gradio as gr

from app.server import AppContext
from core.errors import AuthError, PrefloopError
from storage import audit
from storage import users as users_db

log = logging.getLogger(__name__)

MAX_NAME_LEN = 128


class Authenticator:
    """Checks a login against the database; owned by one app instance."""

    def __init__(self, ctx: AppContext):
        self.ctx = ctx

    async def check(self, username: str, password: str) -> bool:
        """Gradio's auth callable (async, so scrypt and the database run off the event loop)."""
        return await asyncio.to_thread(self.verify, username, password)

    def verify(self, username: str, password: str) -> bool:
        """True for a valid login; raises ``fastapi.HTTPException(429)`` while the name is throttled."""
        from fastapi import HTTPException

        name = (username or "").strip()[:MAX_NAME_LEN]
        now = self.ctx.clock()
        with self.ctx.cursor() as cur:
            locked = users_db.login_locked_until(cur, name)
            if locked is not None and locked > now:
                wait = math.ceil((locked - now).total_seconds())
                audit.record(cur, name, "login_failed", {"reason": "throttled", "retry_in_s": wait})
                log.warning("login for %r refused: throttled for %d s more", name, wait)
                raise HTTPException(status_code=429,
                                    detail=f"too many failed logins for {name!r}: try again in {wait} s")
            stored = users_db.password_hash(cur, name)
            if stored is None:
                users_db.burn_time(password)
                ok = False
            else:
                ok = users_db.verify_password(password, stored)
            if ok:
                users_db.clear_login_failures(cur, name)
                audit.record(cur, name, "login", {})
                return True
            info = _record_failure(cur, name, now)
            audit.record(cur, name, "login_failed", {"reason": "bad credentials", "known_user": stored is not None,
                                                     "failures": info["failures"]})
            log.warning("failed login for %r (%d in a row)", name, info["failures"])
            return False


def _record_failure(cur: duckdb.DuckDBPyConnection, name: str, now) -> dict:
    for attempt in range(5):
        try:
            return users_db.record_login_failure(cur, name, now)
        except (duckdb.TransactionException, duckdb.ConstraintException):
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


def require(ctx: AppContext, username: str | None, role: str, what: str = "this") -> users_db.User:
    """The logged-in user if their role allows ``role``; raises AuthError (audited) otherwise."""
    if not username:
        raise AuthError(f"not logged in: sign in to do {what}")
    with ctx.cursor() as cur:
        user = users_db.get_user(cur, username)
        if user is None:
            raise AuthError(f"user {username!r} no longer exists; ask an admin to add you again")
        if not users_db.role_allows(user.role, role):
            audit.record(cur, username, "refused", {"what": what, "needs": role, "role": user.role})
            raise AuthError(f"{username} is an {user.role}: {what} needs the {role} role")
    return user


def user_of(request: gr.Request | None) -> str | None:
    return getattr(request, "username", None) if request is not None else None


def as_gr_error(fn, *args, **kwargs):
    """Call a handler; our own errors become ``gr.Error`` (shown in the UI, returned to API clients)."""
    try:
        return fn(*args, **kwargs)
    except PrefloopError as err:
        raise gr.Error(str(err), print_exception=False) from None


# ------------------------------------------------------------------------------------ the Users tab

def list_users(ctx: AppContext, username: str | None) -> list[list]:
    """[[name, role, created], ...] (admin only; never a hash)."""
    require(ctx, username, "admin", "listing users")
    with ctx.cursor() as cur:
        return [[u["name"], u["role"], str(u["created_at"])[:19]] for u in users_db.list_users(cur)]


def build_users_tab(ctx: AppContext, demo: gr.Blocks) -> None:
    """Admin tab: who can sign in (users are managed with `prefloop users`)."""
    gr.Markdown("Users sign in with the names below. Add, remove or reset them with "
                "`prefloop users add NAME --role annotator|admin`, `users passwd NAME`, `users remove NAME`.")
    table = gr.Dataframe(headers=["name", "role", "created"], interactive=False, elem_id="pf-users")
    btn = gr.Button("Reload users", elem_id="pf-users-reload")

    def _list(request: gr.Request):
        return as_gr_error(list_users, ctx, user_of(request))

    def _on_load(request: gr.Request):  # fills the table for admins; others never see the tab
        with ctx.cursor() as cur:
            user = users_db.get_user(cur, user_of(request))
        return list_users(ctx, user.name) if user is not None and user.role == "admin" else []

    btn.click(_list, None, table, api_name="list_users", concurrency_limit=ctx.concurrency)
    demo.load(_on_load, None, table, api_visibility="private")
