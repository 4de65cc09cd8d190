"""The edge role: local data, LoRA models and adapters, local training, the `fl-client` command."""
