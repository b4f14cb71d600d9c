"""storage/db.py: the one transaction helper (commit, rollback, retry on a real DuckDB conflict)."""

from __future__ import annotations

import duckdb
import pytest

from storage.db import read_only_transaction, run_in_transaction, scalar, transaction


@pytest.fixture
def cur():
    con = duckdb.connect(":memory:")
    con.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v INTEGER)")
    con.execute("INSERT INTO t VALUES (1, 0)")
    yield con
    con.close()


def test_a_block_commits_or_rolls_back_whole(cur):
    with transaction(cur):
        cur.execute("INSERT INTO t VALUES (2, 0)")
    with pytest.raises(RuntimeError), transaction(cur):
        cur.execute("INSERT INTO t VALUES (3, 0)")
        raise RuntimeError("boom")
    assert [r[0] for r in cur.execute("SELECT k FROM t ORDER BY k").fetchall()] == [1, 2]


def test_a_real_write_conflict_is_retried_until_it_commits(cur):
    other = cur.cursor()
    calls = []

    def bump():
        calls.append(1)
        cur.execute("SELECT v FROM t WHERE k = 1").fetchall()  # our snapshot
        if len(calls) == 1:  # another writer commits a change of the same row after our snapshot
            other.execute("UPDATE t SET v = v + 10 WHERE k = 1")
        cur.execute("UPDATE t SET v = v + 1 WHERE k = 1")  # conflicts the first time
        return len(calls)

    assert run_in_transaction(cur, bump, retries=3) == 2
    assert scalar(cur, "SELECT v FROM t WHERE k = 1") == 11  # the other's +10 and our second +1, nothing twice


def test_without_retries_the_conflict_reaches_the_caller_and_nothing_is_kept(cur):
    other = cur.cursor()

    def bump():
        cur.execute("SELECT v FROM t WHERE k = 1").fetchall()
        other.execute("UPDATE t SET v = v + 10 WHERE k = 1")
        cur.execute("UPDATE t SET v = v + 1 WHERE k = 1")

    with pytest.raises(duckdb.TransactionException):
        run_in_transaction(cur, bump)
    assert scalar(cur, "SELECT v FROM t WHERE k = 1") == 10


def test_other_errors_are_not_retried(cur):
    calls = []

    def fail():
        calls.append(1)
        raise ValueError("not a conflict")

    with pytest.raises(ValueError):
        run_in_transaction(cur, fail, retries=5)
    assert calls == [1]


def test_read_only_block_refuses_writes_and_leaves_no_transaction_open(cur):
    with pytest.raises(duckdb.Error), read_only_transaction(cur):
        cur.execute("INSERT INTO t VALUES (9, 9)")
    with transaction(cur):  # a transaction left open would make this BEGIN fail
        cur.execute("INSERT INTO t VALUES (4, 0)")
    assert scalar(cur, "SELECT count(*) FROM t") == 2
