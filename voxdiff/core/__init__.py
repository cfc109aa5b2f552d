"""Shared foundations used by every stage: errors, configs, atomic outputs, checkpoints, CLI helpers.

Nothing here imports a pipeline stage; every stage may import from here.
"""
