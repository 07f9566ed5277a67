"""The data pipeline: sources -> clean -> filter -> dedup -> decontaminate -> split -> tokenizer -> shards."""
