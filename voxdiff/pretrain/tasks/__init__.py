"""Pretext tasks behind one interface: diffusion (with/without BPR), restorative, contrastive, random."""

from .base import TASKS, PretextTask, get_task_class, register_task  # noqa: F401
