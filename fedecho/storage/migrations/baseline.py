"""What the server's and the site's baseline revisions both do: create the 0.1.0 tables a database lacks (a
0.1.0 database may hold any of them), with the append-only triggers of its audit tables, and drop them again."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from fedecho.storage.columns import append_only_ddl


def id_column() -> sa.Column:
    return sa.Column("id", sa.Integer, primary_key=True, autoincrement=True)


def create_missing(meta: sa.MetaData, append_only: tuple[str, ...]) -> None:
    bind = op.get_bind()
    meta.create_all(bind, checkfirst=True)
    for table in append_only:
        for statement in append_only_ddl(table, bind.dialect.name):
            op.execute(statement)


def drop_all(meta: sa.MetaData) -> None:
    for table in reversed(meta.sorted_tables):
        op.drop_table(table.name)
