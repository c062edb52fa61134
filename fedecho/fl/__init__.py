"""Federated learning pieces shared by the server, client and simulation roles: run files, strategies, exchange."""
