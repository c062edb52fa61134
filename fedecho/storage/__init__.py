"""Durable storage: crash-safe files now; the SQLAlchemy run store joins here later."""

from fedecho.storage.files import atomic_path, atomic_write_bytes, atomic_write_csv, file_sha256

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_csv", "file_sha256"]
