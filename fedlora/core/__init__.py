"""The shared core no role owns: run configuration, tasks and the embedded defaults, data and
partitions, models and adapters, the local training loop, the run directory, the Flower
process runner, keys and certificates, reports and plots, and CLI helpers."""
