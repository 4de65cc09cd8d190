"""The hub's client SDK: what other roles may use to pull, verify and publish adapters
(names and scopes, signed manifests, the verifying HTTP client, publishing a run,
generation requests). It imports the core, never the hub's server side."""
