"""The thin trio layer: listeners, TLS, and the drivers that move bytes to the sans-I/O cores."""
