"""Post-training data derived from a run's own corpus: instruction pairs, preference pairs, GRPO prompts.

The default path needs no outside model and no download, so a model tuned on it stays fully open:
every example can be traced to the corpus document it came from. `remote` optionally lets an outside
model write or judge examples when its API key is set. See `stage.synthesize`.
"""

from trulyopen.synth.stage import synthesize

__all__ = ["synthesize"]
