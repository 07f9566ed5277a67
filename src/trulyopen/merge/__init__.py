"""Merging checkpoints: souping checkpoints of one run, interpolating two models, combining fine-tunes.

`trulyopen merge A B … --method linear|slerp|ties --out DIR` reads models of one architecture
(checkpoints, adapter checkpoints merged into their base, Hugging Face directories or hub names),
merges them tensor by tensor with mergekit's definitions (`methods`: the options, checked without
torch, and the tensor math), and writes a Hugging Face directory with a ledger entry that records
every input's hash (`stage`; the models are read and checked in `inputs`).
"""
