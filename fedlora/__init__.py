"""fedlora: federated, privacy-preserving LoRA fine-tuning on Flower.

One import name for the whole platform. The roles (``fedlora.client``, ``fedlora.server``,
``fedlora.simulations``, ``fedlora.hub``) sit on the shared core (``fedlora.core``), which sits
on the math (``fedlora.strategies``, ``fedlora.privacy``) and the leaf utilities
(``fedlora.atomic``). The role folders live at the repository's top and are linked in here, so
the source tree keeps the design card's layout while everything installs under one name.
"""
