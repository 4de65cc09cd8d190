"""The adapter hub: a registry of global, personal, task and generated LoRA adapters with
provenance, Ed25519-signed manifests and per-client access control, served over HTTP
(``fl-hub serve``). Edge devices pull from it with ``fl-client pull``; federations publish to
it at the end of a run. The server itself imports no torch: it stores and checks files. Only
zero-shot generation (``generators``, loaded at the first generation request) and ``fl-hub
evaluate`` load a model.
"""
