"""Column types and table rules shared by the run store and the site database."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import DDL, BigInteger, Table, Text, TypeDecorator, event


def _json_default(o: object) -> object:
    # numpy / torch scalars arrive from training code; store their Python value.
    item = getattr(o, "item", None)
    return item() if callable(item) else str(o)


class JSONText(TypeDecorator[dict[str, Any]]):
    """A dict as JSON text: unlike the JSON column types it keeps NaN/inf (a diverged loss) on every backend."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: dict[str, Any] | None, dialect: Any) -> str:
        return json.dumps(dict(value or {}), default=_json_default, sort_keys=True)

    def process_result_value(self, value: str | None, dialect: Any) -> dict[str, Any]:
        return json.loads(value) if value else {}


class UInt64(TypeDecorator[int]):
    """Flower's run and node ids are unsigned 64-bit; SQL integers are signed: store the same bits."""

    impl = BigInteger
    cache_ok = True

    def process_bind_param(self, value: int | None, dialect: Any) -> int | None:
        return None if value is None else (value - (1 << 64) if value >= (1 << 63) else value)

    def process_result_value(self, value: int | None, dialect: Any) -> int | None:
        return None if value is None else (value + (1 << 64) if value < 0 else value)


_PG_FUNCTION = (
    "CREATE OR REPLACE FUNCTION fedecho_append_only() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION USING MESSAGE = TG_TABLE_NAME || ' is append-only'; END $$"
)


def append_only_ddl(table: str, dialect: str) -> list[str]:
    """The statements that make table's rows append-only on dialect: triggers that abort any UPDATE or DELETE
    (SQLite and PostgreSQL; other databases: grant the server's role INSERT and SELECT only on it). Each
    statement may run again (a migration that brings an older database up to date)."""
    ops = ("UPDATE", "DELETE")
    if dialect == "sqlite":
        return [
            f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()} BEFORE {op} ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
            for op in ops
        ]
    if dialect == "postgresql":
        out = [_PG_FUNCTION]
        for op in ops:
            name = f"{table}_no_{op.lower()}"
            out += [
                f"DROP TRIGGER IF EXISTS {name} ON {table}",
                f"CREATE TRIGGER {name} BEFORE {op} ON {table} FOR EACH ROW EXECUTE FUNCTION fedecho_append_only()",
            ]
        return out
    return []


def append_only(table: Table) -> None:
    """Mark table append-only: its triggers follow wherever the table is created from the models (create_all);
    a migration that creates the table runs `append_only_ddl` itself."""
    table.info["append_only"] = True
    for dialect in ("sqlite", "postgresql"):
        for statement in append_only_ddl(table.name, dialect):
            event.listen(table, "after_create", DDL(statement).execute_if(dialect=dialect))


__all__ = ["JSONText", "UInt64", "append_only", "append_only_ddl"]
