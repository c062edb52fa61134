"""fedecho.server: the coordinator role (Flower SuperLink + fedecho ServerApp)."""
