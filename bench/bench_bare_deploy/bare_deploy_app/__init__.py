"""A bare Flower app on fedlora's embedded model, for real deployment: see ``../pyproject.toml``."""
