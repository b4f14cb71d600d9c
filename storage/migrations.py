"""Numbered, named schema migrations.

The schema changes only through this list. Each migration runs in its own transaction and is
recorded in ``schema_migrations``; running ``migrate`` again applies only what is missing.
Append new migrations at the end; never edit one that has shipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import duckdb

from storage.db import transaction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


MIGRATIONS: list[Migration] = [
    Migration(
        1,
        "initial_lineage_schema",
        """
        CREATE TABLE images (
            image_id    VARCHAR PRIMARY KEY,          -- sha256 of the bytes
            path        VARCHAR NOT NULL,             -- relative to the workspace
            width       INTEGER NOT NULL,
            height      INTEGER NOT NULL,
            format      VARCHAR NOT NULL,             -- detected from content
            n_bytes     BIGINT NOT NULL,
            created_at  TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        CREATE TABLE prompts (
            prompt_id   VARCHAR PRIMARY KEY,
            image_id    VARCHAR NOT NULL REFERENCES images(image_id),
            question    VARCHAR NOT NULL,
            source      VARCHAR NOT NULL,
            split       VARCHAR NOT NULL CHECK (split IN ('train', 'heldout')),
            reference   VARCHAR,                      -- ground-truth answer, when known
            meta        JSON,
            created_at  TIMESTAMP NOT NULL DEFAULT current_timestamp,
            UNIQUE (image_id, question)
        );
        CREATE TABLE checkpoints (
            checkpoint_id VARCHAR PRIMARY KEY,
            round_id      INTEGER,                    -- NULL for the base model (c0)
            parent_id     VARCHAR,
            base_model    VARCHAR NOT NULL,
            path          VARCHAR NOT NULL,
            kind          VARCHAR NOT NULL CHECK (kind IN ('base', 'adapter', 'merged', 'full')),
            meta          JSON,
            created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        CREATE TABLE rounds (
            round_id             INTEGER PRIMARY KEY,
            policy_checkpoint_id VARCHAR NOT NULL,
            status               VARCHAR NOT NULL,
            step                 VARCHAR,
            config               JSON,
            started_at           TIMESTAMP,
            finished_at          TIMESTAMP,
            error                VARCHAR,
            promoted             BOOLEAN,
            promote_reason       VARCHAR,
            created_at           TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        CREATE TABLE round_steps (
            round_id    INTEGER NOT NULL,
            step        VARCHAR NOT NULL,
            status      VARCHAR NOT NULL CHECK (status IN ('running', 'done', 'failed', 'cancelled')),
            run_dir     VARCHAR,
            job_pid     INTEGER,
            started_at  TIMESTAMP NOT NULL DEFAULT current_timestamp,
            finished_at TIMESTAMP,
            error       VARCHAR,
            summary     JSON,
            PRIMARY KEY (round_id, step)
        );
        CREATE TABLE candidates (
            candidate_id  VARCHAR PRIMARY KEY,
            prompt_id     VARCHAR NOT NULL REFERENCES prompts(prompt_id),
            round_id      INTEGER NOT NULL,
            checkpoint_id VARCHAR,
            text          VARCHAR NOT NULL,
            origin        VARCHAR NOT NULL CHECK (origin IN ('policy', 'seva_augmented', 'imported', 'eval')),
            view          VARCHAR NOT NULL DEFAULT 'original',
            augmentation  JSON,
            sampling      JSON,
            model         VARCHAR,
            engine        VARCHAR,
            seed          BIGINT,
            sample_index  INTEGER NOT NULL DEFAULT 0,
            created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        CREATE TABLE judgments (
            judgment_id   VARCHAR PRIMARY KEY,
            candidate_id  VARCHAR NOT NULL REFERENCES candidates(candidate_id),
            judge         VARCHAR NOT NULL,
            judge_version VARCHAR NOT NULL,
            helpfulness   DOUBLE,
            correctness   DOUBLE,
            coherence     DOUBLE,
            complexity    DOUBLE,
            verbosity     DOUBLE,
            score         DOUBLE,                     -- judge-native scalar (0-100 pointwise, r_i pairwise)
            overall       DOUBLE,                     -- normalised 0-1, used for pairing
            reasoning     VARCHAR,
            raw_output    VARCHAR,
            status        VARCHAR NOT NULL CHECK (status IN ('ok', 'invalid', 'error')),
            latency_ms    DOUBLE,
            tokens_in     INTEGER,
            tokens_out    INTEGER,
            created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        CREATE TABLE pairwise_verdicts (
            judge         VARCHAR NOT NULL,
            judge_version VARCHAR NOT NULL,
            first_id      VARCHAR NOT NULL,
            second_id     VARCHAR NOT NULL,
            winner        VARCHAR CHECK (winner IN ('first', 'second', 'tie')),
            status        VARCHAR NOT NULL CHECK (status IN ('ok', 'invalid', 'error')),
            raw_output    VARCHAR,
            created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp,
            PRIMARY KEY (judge, judge_version, first_id, second_id)
        );
        CREATE SEQUENCE label_seq START 1;
        CREATE TABLE labels (
            label_id       BIGINT PRIMARY KEY DEFAULT nextval('label_seq'),
            prompt_id      VARCHAR NOT NULL REFERENCES prompts(prompt_id),
            round_id       INTEGER NOT NULL,
            annotator      VARCHAR NOT NULL,
            source         VARCHAR NOT NULL DEFAULT 'human' CHECK (source IN ('human', 'imported')),
            kind           VARCHAR NOT NULL DEFAULT 'label' CHECK (kind IN ('label', 'undo')),
            chosen_id      VARCHAR,
            rejected_id    VARCHAR,
            ranking        JSON,
            all_bad        BOOLEAN NOT NULL DEFAULT false,
            skipped_reason VARCHAR,
            comment        VARCHAR,
            active_seconds DOUBLE,
            created_at     TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        CREATE TABLE pairs (
            round_id        INTEGER NOT NULL,
            prompt_id       VARCHAR NOT NULL REFERENCES prompts(prompt_id),
            chosen_id       VARCHAR NOT NULL REFERENCES candidates(candidate_id),
            rejected_id     VARCHAR NOT NULL REFERENCES candidates(candidate_id),
            source          VARCHAR NOT NULL,
            strategy        VARCHAR NOT NULL,
            margin          DOUBLE,
            rubric_delta    JSON,
            chosen_scores   JSON,
            rejected_scores JSON,
            frozen_at       TIMESTAMP,
            created_at      TIMESTAMP NOT NULL DEFAULT current_timestamp,
            PRIMARY KEY (round_id, prompt_id, chosen_id, rejected_id)
        );
        CREATE TABLE train_metrics (
            round_id         INTEGER NOT NULL,
            step             INTEGER NOT NULL,
            epoch            DOUBLE,
            loss             DOUBLE,
            rewards_chosen   DOUBLE,
            rewards_rejected DOUBLE,
            margin           DOUBLE,
            accuracy         DOUBLE,
            lr               DOUBLE,
            PRIMARY KEY (round_id, step)
        );
        CREATE TABLE evals (
            round_id               INTEGER NOT NULL,
            baseline_checkpoint_id VARCHAR NOT NULL,
            checkpoint_id          VARCHAR NOT NULL,
            judge                  VARCHAR NOT NULL,
            eval_set               VARCHAR NOT NULL DEFAULT 'heldout',
            wins                   INTEGER NOT NULL,
            losses                 INTEGER NOT NULL,
            ties                   INTEGER NOT NULL,
            n                      INTEGER NOT NULL,
            created_at             TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        CREATE TABLE users (
            name          VARCHAR PRIMARY KEY,
            role          VARCHAR NOT NULL CHECK (role IN ('admin', 'annotator')),
            password_hash VARCHAR NOT NULL,
            created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        CREATE SEQUENCE audit_seq START 1;
        CREATE TABLE audit_log (
            audit_id BIGINT PRIMARY KEY DEFAULT nextval('audit_seq'),
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
            actor    VARCHAR NOT NULL,
            action   VARCHAR NOT NULL,
            detail   JSON
        );
        """,
    ),
    Migration(
        2,
        "review_queue_claims_login_throttle",
        """
        -- The review queue: one row per (round, order, prompt); ``rank`` 0.. is the serving order,
        -- computed when candidates/judgments are ingested (storage.review.refresh_queue), not per request.
        CREATE TABLE review_queue (
            round_id    INTEGER NOT NULL,
            queue_order VARCHAR NOT NULL,
            prompt_id   VARCHAR NOT NULL,
            rank        INTEGER NOT NULL,
            priority    DOUBLE,                       -- the order's raw key (disagreement, margin, ...)
            computed_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        -- One row per round whose queue was computed; ``version`` changes with every refresh so a
        -- server's in-memory copy of the ranks knows when to reload them.
        CREATE TABLE review_queue_state (
            round_id    INTEGER PRIMARY KEY,
            version     VARCHAR NOT NULL,
            n_prompts   INTEGER NOT NULL,
            judge       VARCHAR,
            computed_at TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        -- Who holds a prompt: at most ``overlap`` slots (0..overlap-1) per (round, prompt) and one row
        -- per annotator. A live claim expires at ``expires_at``; a submitted one is ``done`` and keeps its
        -- slot; a skip moves to a negative slot (``skipped``: holds no place, keeps the annotator off it).
        CREATE TABLE review_claims (
            round_id   INTEGER NOT NULL,
            prompt_id  VARCHAR NOT NULL,
            slot       INTEGER NOT NULL,
            annotator  VARCHAR NOT NULL,
            status     VARCHAR NOT NULL CHECK (status IN ('live', 'done', 'skipped')),
            claimed_at TIMESTAMP NOT NULL,
            expires_at TIMESTAMP NOT NULL,
            PRIMARY KEY (round_id, prompt_id, slot),
            UNIQUE (round_id, prompt_id, annotator)
        );
        -- Failed logins per user name (exponential delay after a few failures).
        CREATE TABLE login_throttle (
            name            VARCHAR PRIMARY KEY,
            failures        INTEGER NOT NULL,
            last_failure_at TIMESTAMP NOT NULL,
            locked_until    TIMESTAMP
        );
        -- The review screen looks up one prompt's judgments and pairwise verdicts per request.
        CREATE INDEX judgments_candidate_idx ON judgments (candidate_id);
        CREATE INDEX pairwise_first_idx ON pairwise_verdicts (first_id);
        """,
    ),
]


def ensure_table(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(
        """CREATE TABLE IF NOT EXISTS schema_migrations (
               version INTEGER PRIMARY KEY,
               name VARCHAR NOT NULL,
               applied_at TIMESTAMP NOT NULL DEFAULT current_timestamp)"""
    )


def applied(con: duckdb.DuckDBPyConnection) -> list[tuple[int, str]]:
    ensure_table(con)
    return [tuple(r) for r in con.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()]


def migrate(con: duckdb.DuckDBPyConnection) -> list[Migration]:
    """Apply every migration not yet recorded; returns the ones applied now."""
    done = {v for v, _ in applied(con)}
    versions = [m.version for m in MIGRATIONS]
    assert versions == sorted(set(versions)), "migration versions must be unique and increasing"
    ran = []
    for m in MIGRATIONS:
        if m.version in done:
            continue
        with transaction(con):
            con.execute(m.sql)
            con.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?)", [m.version, m.name])
        log.info("applied migration %03d %s", m.version, m.name)
        ran.append(m)
    return ran
