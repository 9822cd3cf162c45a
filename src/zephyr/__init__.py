"""Zephyr: SFT then DPO, the way Zephyr-7B was made, from a laptop CPU to a GPU cluster."""

__version__ = "0.1.0"
