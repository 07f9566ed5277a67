"""Post-training data and models: records, chat rendering, the base (adapters, teachers), and the stage
(stage.py) that hands them to the one training loop (train/loop.py) with an objective."""
