"""The read-only SQL guard: DuckDB's own parser decides what a user query is, not a word list.

``check_select(con, sql)`` accepts exactly one SELECT statement (``SHOW``/``DESCRIBE``/``SUMMARIZE``
parse as SELECT and are fine) and returns its text, or raises ``UnsafeQuery`` saying why:

1. ``con.extract_statements`` splits the text with DuckDB's parser: there must be one statement and it
   must be a SELECT (so INSERT/COPY/ATTACH/SET/PRAGMA/CALL/..., and ``SELECT 1; DROP ...`` however it is
   hidden in comments, are refused with the statement types named).
2. ``json_serialize_sql`` gives the full parse tree; every node is walked (FROM clauses, joins,
   subqueries in expressions, CTEs, set operations, PIVOT sources, DESCRIBE/SUMMARIZE targets):
   - a table function must be on ``ALLOWED_TABLE_FUNCTIONS`` (pure functions of their arguments);
     file readers (``read_csv``, ``glob``, ``read_text``...), ``query``/``query_table`` and the
     ``duckdb_*``/``pragma_*`` metadata functions are refused;
   - a table name must be a table or view of this workspace (schema ``main`` of the current
     database), an ``information_schema`` view, or a CTE in scope with a plain identifier as its name.
     This refuses ``FROM '/etc/passwd'`` / ``FROM 'x.csv'`` (DuckDB's replacement scans would read
     the file), other attached databases and DuckDB's system views;
   - scalar functions on ``DENIED_SCALAR_FUNCTIONS`` (environment, sequences, session state) are refused.

Defense in depth lives in ``storage.export``: queries run on their own cursor in a
``BEGIN TRANSACTION READ ONLY`` that is rolled back, with Python replacement scans off. DuckDB's
``enable_external_access``/``lock_configuration`` are database-wide (one-way) switches that would
also stop the owner's own imports, exports and snapshots, so they are not used.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import duckdb

from core.errors import UnsafeQuery

log = logging.getLogger(__name__)

# Table functions that compute rows from their arguments only (no files, no catalog, no network).
ALLOWED_TABLE_FUNCTIONS: frozenset[str] = frozenset({
    "range", "generate_series",  # integer / date sequences
    "unnest",                    # a list value -> rows
    "json_each", "json_tree",    # a JSON value (e.g. pairs.chosen_scores) -> rows
})

# Why some well-known table functions are refused (anything else off the allow-list gets a generic reason).
_TABLE_FUNCTION_REASONS: dict[str, str] = {
    **{f: "reads files" for f in (
        "read_csv", "read_csv_auto", "sniff_csv", "read_text", "read_blob", "read_parquet", "parquet_scan",
        "parquet_metadata", "parquet_schema", "parquet_file_metadata", "parquet_kv_metadata", "read_json",
        "read_json_auto", "read_json_objects", "read_json_objects_auto", "read_ndjson", "read_ndjson_auto",
        "read_ndjson_objects", "json_execute_serialized_sql", "iceberg_scan", "delta_scan", "st_read")},
    "glob": "lists files",
    "query": "runs a SQL string the guard cannot see",
    "query_table": "reads a table named by a string the guard cannot see",
    "checkpoint": "writes to the database",
    "force_checkpoint": "writes to the database",
}
_TABLE_FUNCTION_PREFIX_REASONS: dict[str, str] = {
    "duckdb_": "exposes DuckDB's settings, secrets and attached files",
    "pragma_": "exposes DuckDB's settings and storage",
}

# Scalar functions that read the environment or change state.
DENIED_SCALAR_FUNCTIONS: dict[str, str] = {
    "getenv": "reads the process environment",
    "nextval": "advances a sequence (a write)",
    "currval": "reads sequence state",
    "setseed": "changes session state",
    "which_secret": "reveals secrets",
}

# Table reference node types the walker understands; anything else is refused, not trusted.
_TABLE_REF_TYPES = frozenset({"EMPTY", "BASE_TABLE", "JOIN", "SUBQUERY", "TABLE_FUNCTION", "EXPRESSION_LIST",
                              "SHOW_REF", "PIVOT"})
_PLAIN_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MAX_SHOWN = 160


def _short(sql: str) -> str:
    s = " ".join(sql.split())
    return s if len(s) <= _MAX_SHOWN else s[: _MAX_SHOWN - 3] + "..."


def _type_name(stmt) -> str:
    return str(stmt.type).rsplit(".", 1)[-1]


def split_one(con: duckdb.DuckDBPyConnection, sql: str) -> str:
    """The text of the single SELECT statement in ``sql`` (trailing ``;`` and blanks removed)."""
    if not sql or not sql.strip():
        raise UnsafeQuery("the query is empty; give one SELECT statement")
    try:
        stmts = con.extract_statements(sql)
    except duckdb.Error as err:
        raise UnsafeQuery(f"cannot parse the query: {_first_line(err)}") from None
    if len(stmts) != 1:
        kinds = ", ".join(_type_name(s) for s in stmts) or "none"
        raise UnsafeQuery(f"only one SELECT statement is allowed; found {len(stmts)} statements ({kinds})")
    kind = _type_name(stmts[0])
    if kind != "SELECT":
        raise UnsafeQuery(f"only SELECT statements are allowed; this is a {kind} statement: {_short(stmts[0].query)}")
    return stmts[0].query.strip().rstrip(";").rstrip()


def parse_tree(con: duckdb.DuckDBPyConnection, sql: str) -> list[dict]:
    """DuckDB's parse tree (``json_serialize_sql``) of ``sql``: one dict per statement."""
    raw = con.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()[0]
    tree = json.loads(raw)
    if tree.get("error"):
        msg = tree.get("error_message", "unknown error")
        if "Only SELECT" in msg:
            raise UnsafeQuery("the guard cannot inspect this SELECT (PIVOT with a dynamic column list is not "
                              "supported); write it with GROUP BY / FILTER instead")
        raise UnsafeQuery(f"cannot parse the query: {msg}")
    return tree["statements"]


SECRET_TABLES = frozenset({"users", "login_throttle"})
"""Never readable through exports: password hashes and login state."""


def workspace_tables(con: duckdb.DuckDBPyConnection) -> frozenset[str]:
    """Lower-cased names of the tables and views in schema ``main`` of the current database, less the
    tables that hold secrets (a query naming one is refused like an unknown table)."""
    rows = con.execute(
        "SELECT table_name FROM information_schema.tables "
        "WHERE table_catalog = current_database() AND table_schema = 'main'").fetchall()
    return frozenset(r[0].lower() for r in rows) - SECRET_TABLES


def information_schema_views(con: duckdb.DuckDBPyConnection) -> frozenset[str]:
    rows = con.execute("SELECT view_name FROM duckdb_views() WHERE schema_name = 'information_schema'").fetchall()
    return frozenset(r[0].lower() for r in rows)


def current_database(con: duckdb.DuckDBPyConnection) -> str:
    return con.execute("SELECT current_database()").fetchone()[0]


class _Walker:
    """Checks every node of one statement's parse tree (see the module docstring for the rules)."""

    def __init__(self, tables: frozenset[str], info_views: frozenset[str], database: str):
        self.tables = tables
        self.info_views = info_views
        self.database = database.lower()

    def walk(self, node: Any, ctes: frozenset[str]) -> None:
        if isinstance(node, list):
            for item in node:
                self.walk(item, ctes)
            return
        if not isinstance(node, dict):
            return
        cte_map = node.get("cte_map")
        if isinstance(cte_map, dict):
            ctes = ctes | {str(e.get("key", "")).lower() for e in cte_map.get("map", [])}
        if "class" in node:
            if node["class"] == "FUNCTION":
                self._scalar(node)
        elif "sample" in node and not str(node.get("type", "")).endswith("_NODE"):
            self._table_ref(node, ctes)  # query nodes (SELECT_NODE, ...) also carry "sample"
        for value in node.values():
            if isinstance(value, (dict, list)):
                self.walk(value, ctes)

    def _table_ref(self, ref: dict, ctes: frozenset[str]) -> None:
        kind = ref["type"]
        if kind not in _TABLE_REF_TYPES:
            raise UnsafeQuery(f"the guard does not know the table reference type {kind}; rewrite the query")
        if kind == "BASE_TABLE":
            self._base_table(ref, ctes)
        elif kind == "TABLE_FUNCTION":
            self._table_function(ref.get("function") or {})
        elif kind == "SHOW_REF" and ref.get("show_type") != "SHOW_SPECIAL" and ref.get("table_name"):
            self._base_table(ref, ctes)  # SHOW/DESCRIBE <name>: the name is a table reference too

    def _base_table(self, ref: dict, ctes: frozenset[str]) -> None:
        name = str(ref.get("table_name", ""))
        schema = str(ref.get("schema_name", "")).lower()
        catalog = str(ref.get("catalog_name", "")).lower()
        low = name.lower()
        if catalog and catalog != self.database:
            raise UnsafeQuery(f"{catalog}.{schema}.{name}: only this workspace's database may be read, "
                              f"not the attached database {catalog!r}")
        if schema == "information_schema":
            if low in self.info_views:
                return
            raise UnsafeQuery(f"information_schema.{name} is not an information_schema view")
        if schema and schema != "main":
            raise UnsafeQuery(f"{schema}.{name}: only tables in schema main (and information_schema) may be read")
        if not schema and low in ctes and _PLAIN_IDENT.match(name):
            return
        if low in self.tables:
            return
        if any(c in name for c in "/\\.:~") or name.startswith("'"):
            raise UnsafeQuery(f"{name!r} looks like a file path or URL; the export reads only workspace tables, "
                              "never files")
        shown = ", ".join(sorted(self.tables))
        if name.lower() in SECRET_TABLES:
            raise UnsafeQuery(f"{name!r} holds passwords or login state and is never exported")
        raise UnsafeQuery(f"{name!r} is not a table of this workspace (tables: {shown})")

    def _table_function(self, fn: dict) -> None:
        name = str(fn.get("function_name", "")).lower()
        if name in ALLOWED_TABLE_FUNCTIONS:
            return
        reason = _TABLE_FUNCTION_REASONS.get(name) or next(
            (r for p, r in _TABLE_FUNCTION_PREFIX_REASONS.items() if name.startswith(p)), None)
        allowed = ", ".join(sorted(ALLOWED_TABLE_FUNCTIONS))
        why = f" ({reason})" if reason else ""
        raise UnsafeQuery(f"table function {name}(){why} is not allowed in an export query; allowed: {allowed}")

    def _scalar(self, fn: dict) -> None:
        name = str(fn.get("function_name", "")).lower()
        reason = DENIED_SCALAR_FUNCTIONS.get(name)
        if reason:
            raise UnsafeQuery(f"function {name}() {reason}; it is not allowed in an export query")


def check_select(con: duckdb.DuckDBPyConnection, sql: str) -> str:
    """The statement text of ``sql`` if it is one safe read-only SELECT, else ``UnsafeQuery`` saying why.

    The returned text is exactly what was checked (DuckDB's re-rendering of the parse tree is not used:
    it does not always round-trip, e.g. ``SHOW TABLES`` comes back as ``DESCRIBE "tables"``).
    """
    text = split_one(con, sql)
    (stmt,) = parse_tree(con, text)
    if stmt.get("named_param_map"):
        raise UnsafeQuery("the query has $name parameters; export queries take no parameters")
    walker = _Walker(workspace_tables(con), information_schema_views(con), current_database(con))
    walker.walk(stmt, frozenset())
    log.debug("guard accepted: %s", _short(text))
    return text


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
