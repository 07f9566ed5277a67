"""trulyopen: from raw text to a released language model in which every artifact is verifiable."""

__version__ = "0.1.0"
