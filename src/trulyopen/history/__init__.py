"""Decision records: the runs of a project, what each came from and why, published with a release.

project.py     the project ledger (runs/project.jsonl): starts, ends, reasons, parents, diffs
show.py        `trulyopen history`: the tree, `history diff A B`, and one HTML page with the curves
decisions.py   a release's decisions/: the released run's ancestors and the alternatives beside them
"""
