"""fedecho.sim: the researcher role (virtual hospitals on Flower's simulation engine)."""
