"""Deployment security: the certificate authority, TLS certificates and site authentication keys."""
