"""The run store as fedecho 0.1.0 created it: runs, phases, rounds, site results, checkpoints, sites, events, and
the append-only audit and access_audit.

Creates the tables a database lacks (all of them in a new store, none in one 0.1.0 wrote), so that an existing
store is recognised as this revision. The tables are spelled out here, frozen: a later change to the models is a
later revision.
"""

from __future__ import annotations

import sqlalchemy as sa

from fedecho.storage.migrations.baseline import create_missing, drop_all, id_column

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

APPEND_ONLY = ("audit", "access_audit")


def _runid_column() -> sa.Column:
    return sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False, index=True)


def tables() -> sa.MetaData:
    """The 0.1.0 schema (column types as stored: JSON as TEXT, unsigned 64-bit ids as BIGINT)."""
    meta = sa.MetaData()
    sa.Table(
        "runs", meta, id_column(),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("mode", sa.String(32), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("config_toml", sa.Text, nullable=False),
        sa.Column("flower_run_id", sa.BigInteger, nullable=True),
        sa.Column("created", sa.Double, nullable=False),
        sa.Column("updated", sa.Double, nullable=False),
    )  # fmt: skip
    sa.Table(
        "phases", meta, id_column(), _runid_column(),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("rounds", sa.Integer, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.UniqueConstraint("run_id", "name"),
    )  # fmt: skip
    sa.Table(
        "rounds", meta, id_column(), _runid_column(),
        sa.Column("phase", sa.String(64), nullable=False),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("started", sa.Double, nullable=False),
        sa.Column("finished", sa.Double, nullable=False),
        sa.Column("sites_sampled", sa.Integer, nullable=False),
        sa.Column("sites_replied", sa.Integer, nullable=False),
        sa.Column("train", sa.Text, nullable=False),
        sa.Column("evaluate", sa.Text, nullable=False),
        sa.Column("server", sa.Text, nullable=False),
        sa.UniqueConstraint("run_id", "phase", "round"),
    )  # fmt: skip
    sa.Table(
        "site_results", meta, id_column(), _runid_column(),
        sa.Column("phase", sa.String(64), nullable=False),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("site", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("metrics", sa.Text, nullable=False),
        sa.Column("num_examples", sa.Integer, nullable=False),
        sa.Column("bytes_down", sa.Integer, nullable=False),
        sa.Column("bytes_up", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("created", sa.Double, nullable=False),
        sa.UniqueConstraint("run_id", "phase", "round", "site", "kind"),
    )  # fmt: skip
    sa.Table(
        "checkpoints", meta, id_column(), _runid_column(),
        sa.Column("phase", sa.String(64), nullable=False),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created", sa.Double, nullable=False),
        sa.UniqueConstraint("run_id", "phase", "round"),
    )  # fmt: skip
    sa.Table(
        "sites", meta,
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("public_key_sha256", sa.String(64), nullable=True),
        sa.Column("node_id", sa.BigInteger, nullable=True),
        sa.Column("first_seen", sa.Double, nullable=False),
        sa.Column("last_seen", sa.Double, nullable=False),
    )  # fmt: skip
    sa.Table(
        "events", meta, id_column(),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=True, index=True),
        sa.Column("site", sa.String(200), nullable=True),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("created", sa.Double, nullable=False),
    )  # fmt: skip
    sa.Table(
        "audit", meta, id_column(),
        sa.Column("run_id", sa.Integer, nullable=False, index=True),  # no foreign key: the log outlives the run
        sa.Column("phase", sa.String(64), nullable=False),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("site", sa.String(200), nullable=False),
        sa.Column("node_id", sa.BigInteger, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("bytes_down", sa.BigInteger, nullable=False),
        sa.Column("bytes_up", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created", sa.Double, nullable=False),
    )  # fmt: skip
    sa.Table(
        "access_audit", meta, id_column(),
        sa.Column("source", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("request", sa.Text, nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("created", sa.Double, nullable=False),
    )  # fmt: skip
    return meta


def upgrade() -> None:
    create_missing(tables(), APPEND_ONLY)


def downgrade() -> None:
    drop_all(tables())
