"""Revisions of the run store's schema (fedecho.storage.store.Store)."""
