"""Edge-deployment compression toolchain: prune, quantize, factorize, export, profile."""
__version__ = "0.1.0"
