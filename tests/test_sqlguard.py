"""The export guard: hostile SQL is refused with a reason, legit SELECTs run, nothing changes."""

from __future__ import annotations

import time

import duckdb
import pytest

from core.errors import QueryTimeout, UnsafeQuery
from storage.export import export_query, read_only_cursor, run_query
from storage.sqlguard import ALLOWED_TABLE_FUNCTIONS, check_select
from storage.workspace import init_workspace

TABLES = ["images", "prompts", "candidates", "judgments", "labels", "pairs", "rounds", "checkpoints", "users",
          "audit_log", "schema_migrations"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    w = init_workspace(tmp_path_factory.mktemp("guard") / "ws")
    cur = w.cursor()
    cur.execute("INSERT INTO images (image_id, path, width, height, format, n_bytes) VALUES "
                "('i1', 'images/i1.png', 4, 4, 'PNG', 10), ('i2', 'images/i2.png', 8, 8, 'PNG', 20)")
    cur.execute("INSERT INTO prompts (prompt_id, image_id, question, source, split, meta) VALUES "
                "('p1', 'i1', 'What is it?', 'test', 'train', '{\"tags\": [\"a\", \"b\"]}'), "
                "('p2', 'i2', 'How many?', 'test', 'heldout', NULL)")
    cur.execute("INSERT INTO candidates (candidate_id, prompt_id, round_id, text, origin) VALUES "
                "('c1', 'p1', 1, 'a cat', 'policy'), ('c2', 'p1', 1, 'a dog', 'policy'), "
                "('c3', 'p2', 1, 'three', 'policy')")
    cur.execute("INSERT INTO pairs (round_id, prompt_id, chosen_id, rejected_id, source, strategy, margin, "
                "chosen_scores) VALUES (1, 'p1', 'c1', 'c2', 'human', 'human-only', 1.0, '{\"overall\": 0.8}')")
    cur.execute("INSERT INTO labels (prompt_id, round_id, annotator, chosen_id, rejected_id) "
                "VALUES ('p1', 1, 'ann', 'c1', 'c2')")
    cur.execute("INSERT INTO users (name, role, password_hash) VALUES ('admin', 'admin', 'x')")
    yield w
    w.close()


def checksum(cur) -> dict:
    sums = {t: cur.execute(f"SELECT count(*), bit_xor(hash({t})) FROM {t}").fetchone() for t in TABLES}
    sums["_sequences"] = cur.execute("SELECT list((sequence_name, last_value) ORDER BY sequence_name) "
                                     "FROM duckdb_sequences()").fetchone()
    sums["_tables"] = cur.execute("SELECT list(table_name ORDER BY table_name) FROM information_schema.tables "
                                  "WHERE table_catalog = current_database()").fetchone()
    sums["_databases"] = cur.execute("SELECT list(database_name ORDER BY database_name) FROM duckdb_databases()"
                                     ).fetchone()
    return sums


# (hostile SQL, a fragment the refusal message must contain)
HOSTILE = [
    ("INSERT INTO users VALUES ('x', 'admin', 'h', now())", "INSERT statement"),
    ("UPDATE prompts SET question = 'x'", "UPDATE statement"),
    ("DELETE FROM prompts", "DELETE statement"),
    ("TRUNCATE labels", "DELETE statement"),
    ("CREATE TABLE evil (x INT)", "CREATE statement"),
    ("CREATE VIEW v AS SELECT 1", "CREATE statement"),
    ("CREATE MACRO m() AS 1", "CREATE statement"),
    ("DROP TABLE pairs", "DROP statement"),
    ("ALTER TABLE prompts ADD COLUMN x INT", "ALTER statement"),
    ("MERGE INTO users USING users AS s ON true WHEN MATCHED THEN DELETE", "MERGE_INTO statement"),
    ("ATTACH '{tmp}/evil.duckdb' AS evil", "ATTACH statement"),
    ("DETACH prefloop", "DETACH statement"),
    ("USE system", "SET statement"),
    ("COPY prompts TO '{tmp}/leak.csv'", "COPY statement"),
    ("COPY (SELECT * FROM users) TO '{tmp}/leak.parquet' (FORMAT parquet)", "COPY statement"),
    ("COPY prompts FROM '/etc/passwd'", "COPY statement"),
    ("EXPORT DATABASE '{tmp}/dump'", "EXPORT statement"),
    ("IMPORT DATABASE '{tmp}/dump'", "PRAGMA statement"),
    ("INSTALL httpfs", "LOAD statement"),
    ("LOAD httpfs", "LOAD statement"),
    ("SET enable_external_access = false", "SET statement"),
    ("SET memory_limit = '1MB'", "SET statement"),
    ("RESET memory_limit", "SET statement"),
    ("PRAGMA database_list", "PRAGMA statement"),
    ("PRAGMA enable_profiling", "PRAGMA statement"),
    ("CALL pragma_version()", "CALL statement"),
    ("CHECKPOINT", "CALL statement"),
    ("VACUUM", "VACUUM statement"),
    ("BEGIN TRANSACTION", "TRANSACTION statement"),
    ("PREPARE p AS SELECT 1", "PREPARE statement"),
    ("EXPLAIN ANALYZE SELECT * FROM prompts", "EXPLAIN statement"),
    ("SELECT 1; DROP TABLE prompts", "found 2 statements (SELECT, DROP)"),
    ("SELECT 1 /* ; */ ; DELETE FROM prompts", "found 2 statements (SELECT, DELETE)"),
    ("SELECT 1; SELECT 2", "found 2 statements"),
    ("-- comment\nDELETE FROM prompts", "DELETE statement"),
    ("/* SELECT */ DELETE FROM prompts", "DELETE statement"),
    ("", "empty"),
    ("   ;  ", "found 0 statements"),
    ("SELEC 1", "cannot parse"),
    # files read through table functions, anywhere in the tree
    ("SELECT * FROM read_csv('/etc/passwd')", "read_csv() (reads files)"),
    ("SELECT * FROM read_csv_auto('/etc/passwd')", "read_csv_auto() (reads files)"),
    ("SELECT * FROM sniff_csv('/etc/passwd')", "sniff_csv() (reads files)"),
    ("SELECT * FROM read_text('/etc/passwd')", "read_text() (reads files)"),
    ("SELECT content FROM read_blob('/etc/hostname')", "read_blob() (reads files)"),
    ("SELECT * FROM glob('/etc/*')", "glob() (lists files)"),
    ("SELECT * FROM read_parquet('x.parquet')", "read_parquet() (reads files)"),
    ("SELECT * FROM parquet_scan('x.parquet')", "parquet_scan() (reads files)"),
    ("SELECT * FROM parquet_metadata('x.parquet')", "parquet_metadata() (reads files)"),
    ("SELECT * FROM read_json_auto('/etc/passwd')", "read_json_auto() (reads files)"),
    ("SELECT * FROM read_ndjson('x.jsonl')", "read_ndjson() (reads files)"),
    ("SELECT * FROM query('DELETE FROM prompts')", "query() (runs a SQL string"),
    ("SELECT * FROM query_table('users')", "query_table()"),
    ("SELECT * FROM duckdb_settings()", "duckdb_settings()"),
    ("SELECT * FROM duckdb_secrets()", "duckdb_secrets()"),
    ("SELECT * FROM pragma_table_info('users')", "pragma_table_info()"),
    ("SELECT * FROM checkpoint()", "checkpoint() (writes"),
    ("SELECT * FROM sql_auto_complete('SEL')", "not allowed"),
    # files read through replacement scans (a path used as a table name)
    ("SELECT * FROM '/etc/passwd'", "looks like a file path"),
    ("SELECT * FROM 'x.csv'", "looks like a file path"),
    ("SELECT * FROM \"data.parquet\"", "looks like a file path"),
    ("SELECT * FROM 'https://example.org/a.parquet'", "looks like a file path"),
    ("FROM '~/.ssh/id_rsa'", "looks like a file path"),
    ("DESCRIBE '/etc/passwd'", "looks like a file path"),
    ("SHOW '/etc/passwd'", "looks like a file path"),
    ("SUMMARIZE 'leak.csv'", "looks like a file path"),
    ("WITH \"x.csv\" AS (SELECT * FROM \"x.csv\") SELECT * FROM \"x.csv\"", "looks like a file path"),
    # hidden in CTEs, subqueries, set operations, lateral joins, IN lists, scalar subqueries, PIVOT sources
    ("WITH a AS (SELECT * FROM read_csv('/etc/passwd')) SELECT * FROM a", "read_csv()"),
    ("WITH a AS (SELECT 1), b AS (SELECT * FROM a, glob('*')) SELECT * FROM b", "glob()"),
    ("SELECT * FROM (SELECT * FROM (SELECT * FROM read_text('/etc/hosts')))", "read_text()"),
    ("SELECT prompt_id FROM prompts UNION SELECT content FROM read_text('/etc/hosts')", "read_text()"),
    ("SELECT 1 EXCEPT SELECT * FROM '/etc/passwd'", "looks like a file path"),
    ("SELECT * FROM prompts p, LATERAL (SELECT * FROM glob(p.question))", "glob()"),
    ("SELECT * FROM prompts p JOIN read_csv('/etc/passwd') r ON true", "read_csv()"),
    ("SELECT * FROM prompts WHERE question IN (SELECT content FROM read_text('/etc/hosts'))", "read_text()"),
    ("SELECT (SELECT count(*) FROM read_blob('/etc/hosts')) AS n", "read_blob()"),
    ("SELECT * FROM prompts WHERE EXISTS (SELECT 1 FROM 'x.csv')", "looks like a file path"),
    ("SELECT * FROM prompts ORDER BY (SELECT count(*) FROM glob('*'))", "glob()"),
    ("SELECT list_transform([1], x -> (SELECT count(*) FROM read_text('/etc/hosts')))", "read_text()"),
    ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r, glob('*') WHERE n < 3) SELECT * FROM r",
     "glob()"),
    ("SELECT * FROM (UNPIVOT '/x.csv' ON a INTO NAME n VALUE v)", "looks like a file path"),
    # other databases, system views, schemas
    ("SELECT * FROM system.main.duckdb_tables", "attached database 'system'"),
    ("SELECT * FROM temp.main.x", "attached database 'temp'"),
    ("SELECT * FROM duckdb_tables", "not a table of this workspace"),
    ("SELECT * FROM pg_catalog.pg_settings", "schema main"),
    ("SELECT * FROM no_such_table", "not a table of this workspace"),
    ("SELECT * FROM (WITH a AS (SELECT 1) SELECT 1), a", "not a table of this workspace"),
    # scalar functions with side effects or access to the environment
    ("SELECT getenv('HOME')", "getenv() reads the process environment"),
    ("SELECT nextval('label_seq')", "nextval() advances a sequence"),
    ("SELECT currval('label_seq')", "currval()"),
    ("SELECT setseed(0.5)", "setseed()"),
    ("SELECT * FROM prompts WHERE question = getenv('USER')", "getenv()"),
    ("SELECT $name", "parameters"),
]


@pytest.mark.parametrize("sql,fragment", HOSTILE, ids=[h[0][:48] for h in HOSTILE])
def test_hostile_sql_refused_with_reason(ws, tmp_path, sql, fragment):
    sql = sql.replace("{tmp}", str(tmp_path))
    with pytest.raises(UnsafeQuery) as e:
        check_select(ws.cursor(), sql)
    assert fragment in str(e.value), str(e.value)
    assert "\n" not in str(e.value), "the message is one line"


LEGIT = [
    ("SELECT count(*) AS n FROM prompts", [(2,)]),
    (("SELECT p.prompt_id, count(c.candidate_id) AS k FROM prompts p LEFT JOIN candidates c USING (prompt_id) "
      "GROUP BY ALL ORDER BY 1"), [("p1", 2), ("p2", 1)]),
    ("WITH k AS (SELECT prompt_id, count(*) AS n FROM candidates GROUP BY 1) SELECT max(n) FROM k", [(2,)]),
    (("SELECT candidate_id, row_number() OVER (PARTITION BY prompt_id ORDER BY candidate_id DESC) AS r "
      "FROM candidates ORDER BY candidate_id"), [("c1", 2), ("c2", 1), ("c3", 1)]),
    ("SELECT json_extract_string(meta, '$.tags[1]') FROM prompts WHERE meta IS NOT NULL", [("b",)]),
    ("SELECT sum(range) FROM range(5)", [(10,)]),
    ("SELECT count(*) FROM generate_series(1, 3)", [(3,)]),
    ("SELECT unnest([1, 2]) AS x ORDER BY x", [(1,), (2,)]),
    ("SELECT key, value::DOUBLE FROM pairs, json_each(pairs.chosen_scores)", [("overall", 0.8)]),
    ("SELECT prompt_id FROM prompts WHERE image_id IN (SELECT image_id FROM images WHERE width > 4)", [("p2",)]),
    ("SELECT prompt_id FROM prompts UNION ALL SELECT candidate_id FROM candidates ORDER BY 1 LIMIT 2",
     [("c1",), ("c2",)]),
    ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 4) SELECT max(n) FROM r", [(4,)]),
    ("FROM main.prompts SELECT prompt_id ORDER BY prompt_id LIMIT 1", [("p1",)]),
    ("SELECT count(*) FROM information_schema.tables WHERE table_name = 'pairs'", [(1,)]),
    ("SELECT 'DROP TABLE x; -- not code' AS s", [("DROP TABLE x; -- not code",)]),
    ("SELECT 1 AS one; -- trailing comment", [(1,)]),
    ("select   count(*)\nfrom PAIRS\n/* a comment */", [(1,)]),
    ("SELECT current_setting('threads') > 0", [(True,)]),
]


@pytest.mark.parametrize("sql,expected", LEGIT, ids=[q[0][:48] for q in LEGIT])
def test_legit_select_accepted_and_runs(ws, sql, expected):
    cur = ws.cursor()
    assert check_select(cur, sql).lower().lstrip().startswith(("select", "with", "from"))
    assert [tuple(r.values()) for r in run_query(cur, sql).to_pylist()] == expected


def test_show_and_describe_are_allowed(ws):
    names = run_query(ws.cursor(), "SHOW TABLES").column("name").to_pylist()
    assert "pairs" in names and "users" in names
    cols = run_query(ws.cursor(), "DESCRIBE prompts").column("column_name").to_pylist()
    assert cols[:3] == ["prompt_id", "image_id", "question"]


def test_allow_list_is_small():
    assert ALLOWED_TABLE_FUNCTIONS == {"range", "generate_series", "unnest", "json_each", "json_tree"}


def test_slow_query_stopped_by_timeout(ws):
    t0 = time.perf_counter()
    with pytest.raises(QueryTimeout, match=r"longer than 0\.5 s"):
        run_query(ws.cursor(), "SELECT count(*) FROM range(1000000000) a, range(1000000) b "
                               "WHERE a.range * b.range = 7", timeout_s=0.5)
    assert time.perf_counter() - t0 < 5
    assert run_query(ws.cursor(), "SELECT count(*) FROM prompts").column(0).to_pylist() == [2], "still usable"


def test_read_only_transaction_is_a_second_wall(ws):
    """Even SQL that skipped the guard cannot write: the query cursor's transaction is read-only."""
    with read_only_cursor(ws.cursor()) as q, pytest.raises(duckdb.TransactionException, match="read-only"):
        q.execute("DELETE FROM prompts")
    with read_only_cursor(ws.cursor()) as q, pytest.raises(duckdb.TransactionException, match="read-only"):
        q.execute("SELECT nextval('label_seq')")
    secret_frame = __import__("pandas").DataFrame({"x": [1]})  # noqa: F841  (a Python replacement scan target)
    with read_only_cursor(ws.cursor()) as q, pytest.raises(duckdb.CatalogException):
        q.execute("SELECT * FROM secret_frame")


def test_nothing_changed_after_hostile_queries(ws, tmp_path):
    cur = ws.cursor()
    before = checksum(cur)
    for sql, _ in HOSTILE:
        sql = sql.replace("{tmp}", str(tmp_path))
        with pytest.raises(UnsafeQuery):
            run_query(cur, sql, timeout_s=5)
        with pytest.raises(UnsafeQuery):
            export_query(cur, sql, tmp_path / "out.csv", "csv", timeout_s=5)
    with pytest.raises(QueryTimeout):
        run_query(cur, "SELECT count(*) FROM range(1000000000) a, range(1000000) b WHERE a.range = b.range",
                  timeout_s=0.3)
    for sql, _ in LEGIT:
        run_query(cur, sql)
    assert checksum(cur) == before
    assert list(tmp_path.iterdir()) == [], "no file was written by a refused query"


def test_secret_tables_never_exported(tmp_path):
    from core.errors import UnsafeQuery
    from storage.sqlguard import check_select
    from storage.workspace import init_workspace

    ws = init_workspace(tmp_path / "w")
    try:
        for sql in ("SELECT * FROM users", "SELECT password_hash FROM main.users",
                    "SELECT * FROM prompts WHERE prompt_id IN (SELECT name FROM users)", "SELECT * FROM login_throttle"):
            with pytest.raises(UnsafeQuery, match="never exported"):
                check_select(ws.con, sql)
    finally:
        ws.close()
