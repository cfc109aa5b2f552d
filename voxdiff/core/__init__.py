"""Shared foundations used by every stage: errors, configs, atomic outputs, checkpoints, CLI helpers,
runtime settings and the one training engine (``engine``, ``trainstate``).

Nothing here imports a pipeline stage; every stage may import from here.
"""
