"""What the ServerApp and the ClientApp share: the model, loaded as Flower's LLM example does.

Heavy imports (torch, transformers, peft) happen inside :func:`load_lora_model`, so their
cost shows up where a message pays it: in every ClientApp process (a new one per message in
deployment) and once in the ServerApp.
"""

from __future__ import annotations

from typing import Any


def load_lora_model() -> tuple[Any, Any]:
    """(LoRA-wrapped embedded base model, its tokenizer), with fedlora's default LoRA
    settings (``fedlora.core.model.LoraSettings()``: rank 8, alpha 16, no dropout, all linear layers)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedlora.core.embedded import default_model_dir

    model_dir = str(default_model_dir())
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", bias="none", task_type="CAUSAL_LM"
    )
    torch.manual_seed(0)  # the server's initial lora_A; clients overwrite theirs with the received state
    return get_peft_model(model, config), tokenizer
