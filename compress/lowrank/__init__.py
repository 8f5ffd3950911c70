"""Low-rank factorization: methods register here."""
from compress.registry import Registry
from compress.stages import Method

METHODS: Registry[Method] = Registry("low-rank method")
