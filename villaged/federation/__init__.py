"""Server-to-server federation."""
