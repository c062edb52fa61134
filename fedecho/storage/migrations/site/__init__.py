"""Revisions of a site database's schema (fedecho.storage.site_store.SiteStore)."""
