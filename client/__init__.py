"""fedecho.client: the hospital role (Flower SuperNode + fedecho ClientApp)."""
