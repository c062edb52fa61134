"""A site database as fedecho 0.1.0 created it: the manifest (files), the append-only site_audit, bundle_approvals
and the privacy_ledger.

0.1.0 created each table when the module that defines it was first imported by a process that opened the
database, so a database it wrote may hold any of them: this revision creates those it lacks. The tables are
spelled out here, frozen: a later change to the models is a later revision.
"""

from __future__ import annotations

import sqlalchemy as sa

from fedecho.storage.migrations.baseline import create_missing, drop_all, id_column

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

APPEND_ONLY = ("site_audit",)


def tables() -> sa.MetaData:
    """The 0.1.0 schema (column types as stored: JSON as TEXT, unsigned 64-bit ids as BIGINT)."""
    meta = sa.MetaData()
    sa.Table(
        "files", meta, id_column(),
        sa.Column("record_key", sa.String(32), nullable=True, unique=True),
        sa.Column("sha256", sa.String(64), nullable=True, index=True),
        sa.Column("path_hash", sa.String(64), nullable=False, index=True),
        sa.Column("source_kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("patient", sa.String(64), nullable=False, index=True),
        sa.Column("study", sa.String(64), nullable=False),
        sa.Column("series", sa.String(64), nullable=False),
        sa.Column("instance", sa.String(64), nullable=False),
        sa.Column("frames", sa.Integer, nullable=True),
        sa.Column("fps", sa.Double, nullable=True),
        sa.Column("height", sa.Integer, nullable=True),
        sa.Column("width", sa.Integer, nullable=True),
        sa.Column("channels", sa.Integer, nullable=True),
        sa.Column("transfer_syntax", sa.String(64), nullable=False),
        sa.Column("manufacturer", sa.String(64), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("sector", sa.String(96), nullable=False),
        sa.Column("split", sa.String(8), nullable=False),
        sa.Column("targets", sa.Text, nullable=False),
        sa.Column("ingested", sa.Double, nullable=False),
    )  # fmt: skip
    sa.Table(
        "site_audit", meta, id_column(),
        sa.Column("created", sa.Double, nullable=False),
        sa.Column("flower_run_id", sa.BigInteger, nullable=True),
        sa.Column("run_id", sa.Integer, nullable=True),
        sa.Column("round", sa.Integer, nullable=True),
        sa.Column("phase", sa.String(64), nullable=False),
        sa.Column("message_type", sa.String(64), nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("bundle_sha256", sa.String(64), nullable=False),
        sa.Column("manifest_sha256", sa.String(64), nullable=True),
        sa.Column("epsilon", sa.Double, nullable=True),
        sa.Column("update_sha256", sa.String(64), nullable=True),
        sa.Column("update_bytes", sa.Integer, nullable=False),
    )  # fmt: skip
    sa.Table(
        "bundle_approvals", meta,
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("approved", sa.Double, nullable=False),
        sa.Column("note", sa.Text, nullable=False),
    )  # fmt: skip
    sa.Table(
        "privacy_ledger", meta, id_column(),
        sa.Column("run", sa.String(200), nullable=False),
        sa.Column("phase", sa.String(64), nullable=False),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("noise_multiplier", sa.Double, nullable=False),
        sa.Column("sample_rate", sa.Double, nullable=False),
        sa.Column("steps", sa.Integer, nullable=False),
        sa.Column("unit", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created", sa.Double, nullable=False),
        sa.Column("updated", sa.Double, nullable=False),
    )  # fmt: skip
    return meta


def upgrade() -> None:
    create_missing(tables(), APPEND_ONLY)


def downgrade() -> None:
    drop_all(tables())
