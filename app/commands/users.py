"""prefloop users add|list|passwd|remove: who may sign in to the studio, with which role.

Passwords are prompted for (getpass, twice) on a terminal, or read as one line from stdin when piped
(``echo "$PW" | prefloop users add ann --role annotator``); they are stored only as a scrypt hash and
never printed or logged. Every change is in the audit log.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from app.commands._ws import actor, workspace_for
from core.errors import UsageError
from storage import audit
from storage import users as users_db


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = sub.add_parser("add", help="add a user (password prompted, or one line on stdin)")
    a.add_argument("name")
    a.add_argument("--role", choices=users_db.ROLES, default="annotator", help="annotator (default) or admin")
    sub.add_parser("list", help="list users and roles")
    pw = sub.add_parser("passwd", help="set a user's password")
    pw.add_argument("name")
    rm = sub.add_parser("remove", help="remove a user (their labels stay)")
    rm.add_argument("name")
    r = sub.add_parser("role", help="change a user's role")
    r.add_argument("name")
    r.add_argument("role", choices=users_db.ROLES)
    for sp in (a, pw, rm, r, sub.choices["list"]):  # `-w` may also follow the action
        sp.add_argument("-w", "--workspace", default=argparse.SUPPRESS, help="workspace folder")
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log debug messages")


def read_password(name: str, stdin=None) -> str:
    """The new password: getpass twice on a terminal, else the first line of stdin."""
    stdin = stdin or sys.stdin
    if stdin.isatty():
        first = getpass.getpass(f"password for {name}: ")
        if getpass.getpass("repeat it: ") != first:
            raise UsageError("the two passwords differ; nothing was changed")
        pw = first
    else:
        pw = stdin.readline().rstrip("\r\n")
    if not pw:
        raise UsageError("no password given (type it at the prompt or pipe one line on stdin)")
    return users_db.check_password(pw)


def run(args: argparse.Namespace) -> int:
    if args.action in ("add", "passwd", "remove", "role"):
        users_db.check_name(args.name)
    with workspace_for(args, "prefloop users") as ws:
        cur = ws.cursor()
        if args.action == "list":
            rows = users_db.list_users(cur)
            if not rows:
                print("no users yet; add an admin with `prefloop users add NAME --role admin`")
            for u in rows:
                print(f"{u['name']:<24} {u['role']:<10} added {str(u['created_at'])[:19]}")
            return 0
        if args.action == "add":
            if users_db.get_user(cur, args.name) is not None:
                raise UsageError(f"user {args.name!r} already exists; change the password with "
                                 f"`prefloop users passwd {args.name}`")
            users_db.add_user(cur, args.name, args.role, read_password(args.name))
            audit.record(cur, actor(), "user_add", {"name": args.name, "role": args.role})
            print(f"added {args.name} ({args.role})")
        elif args.action == "passwd":
            if users_db.get_user(cur, args.name) is None:
                raise UsageError(f"no user named {args.name!r}; `prefloop users list` shows who exists")
            users_db.set_password(cur, args.name, read_password(args.name))
            users_db.clear_login_failures(cur, args.name)
            audit.record(cur, actor(), "user_passwd", {"name": args.name})
            print(f"password of {args.name} changed")
        elif args.action in ("remove", "role"):
            user = users_db.get_user(cur, args.name)
            if user is None:
                raise UsageError(f"no user named {args.name!r}; `prefloop users list` shows who exists")
            demoting = args.action == "remove" or args.role != "admin"
            if user.role == "admin" and demoting and users_db.count_users(cur, "admin") == 1:
                raise UsageError(f"{args.name} is the only admin; add another admin first")
            if args.action == "remove":
                users_db.remove_user(cur, args.name)
                audit.record(cur, actor(), "user_remove", {"name": args.name})
                print(f"removed {args.name} (their labels stay)")
            else:
                users_db.set_role(cur, args.name, args.role)
                audit.record(cur, actor(), "user_role", {"name": args.name, "role": args.role})
                print(f"{args.name} is now {args.role}")
    return 0
