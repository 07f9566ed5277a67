"""Verifiable rewards: score a completion by checking it, not by asking another model.

GRPO post-training uses them as rewards now; code-execution evaluation will reuse them. `sandbox`
runs untrusted code; `verifiers` turns a data record's verifier spec into a score of 0 or 1.
"""
