"""The researcher's role: ``fl-sim`` runs the server and client apps with many virtual clients on
Flower's simulation runtime, compares strategies over seeds against a centralised baseline,
evaluates personal adapters in one batched pass, and rebuilds the embedded base model
(``pretrain``). The task suite and the base model themselves live in :mod:`fedlora.core`."""
