"""Simulation mode and the embedded default: the procedural task suite and the tiny base model."""
