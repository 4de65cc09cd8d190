"""A tiny Flower app used by the runner's integration tests (numpy arithmetic, results known by hand)."""
