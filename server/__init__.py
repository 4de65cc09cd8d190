"""The server role: the Flower ServerApp, the run directory, and (later) `fl-server`."""
