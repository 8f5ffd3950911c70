"""Low-rank factorization: methods register here."""
from compress.registry import Registry
from compress.stages import Method

METHODS: Registry[Method] = Registry("low-rank method")

from compress.lowrank import methods  # noqa: E402,F401 - registers svd, fwsvd (and the "lowrank" structure edit)
