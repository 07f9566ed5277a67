"""Tracing: which training documents a text, or a model's answer, repeats verbatim.

index.py   the index stage: an infini-gram suffix array over the train shards
spans.py   OLMoTrace's spans of a text found in the index, their documents, and n-gram counts
"""
