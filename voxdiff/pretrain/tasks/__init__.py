"""Pretext tasks behind one interface: diffusion (with/without BPR), restorative, contrastive, random."""

from .base import PretextTask, TASKS, register_task, get_task_class  # noqa: F401
