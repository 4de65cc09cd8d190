"""Zero-shot adapter generation: maps from a task's description (or a few of its examples) to
LoRA parameters, trained on a library of expert adapters (SG-LoRA, ICM-LoRA).

Unlike the rest of ``hub``, this package needs torch: the hub server imports it only when a
generation request arrives, so a hub that serves no generators starts without it.
"""
