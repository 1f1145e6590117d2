"""relay: a reverse-connection TCP relay over one multiplexed TLS tunnel."""
__version__ = "0.1.0"
