"""What an epsilon is about (the privacy unit), stated once for the privacy report, the hub's
provenance and personal adapters. Torch-free, so the hub can state it without loading Opacus."""

PRIVACY_UNIT = (
    "one training example of one client's local dataset (sample-level DP-SGD); epsilon composes over "
    "every round the client took part in, across runs that share its state directory"
)
