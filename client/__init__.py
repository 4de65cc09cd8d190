"""The edge role: the Flower ClientApp and what each message computes, the node that
``fl-client start`` keeps running (SuperNode, its own task executor), personalisation, and the
``fl-client`` command (keys, fine-tuning, pull/push/personalize through the hub's SDK).
Models, data and the training loop come from :mod:`fedlora.core`."""
