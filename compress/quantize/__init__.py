"""Quantization: methods register here; compress/quantize/fakequant.py holds the shared quantizer modules."""
from compress.registry import Registry
from compress.stages import Method

METHODS: Registry[Method] = Registry("quantization method")

from compress.quantize import minmax  # noqa: E402,F401 - registers `minmax` (and the "quantize" structure edit)
from compress.quantize import genie, nncf_ptq  # noqa: E402,F401 - registers `genie` and `nncf` (issue 4)
