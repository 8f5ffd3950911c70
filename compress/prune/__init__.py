"""Structured (channel) pruning: methods register here; compress/prune/engine.py removes the channels."""
from compress.registry import Registry
from compress.stages import Method

METHODS: Registry[Method] = Registry("pruning method")

from compress.prune import baselines  # noqa: E402,F401  - registers l1 and random
from compress.prune import beta_rank, hrank, polarization, ftwt  # noqa: E402,F401  - registers beta-rank, hrank, polarization, ftwt (issue 3)
