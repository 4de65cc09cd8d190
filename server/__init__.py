"""The server role: the Flower ServerApp (strategy from the run config, per-round records,
checkpoints and resume, the server's own evaluation), the server directory (CA, keys, enrolled
nodes), the guarded SuperLink and ``fl-server`` (init, enroll, revoke, start)."""
