"""The open release: bundle, cards, the Model Openness Framework audit, verify and report."""
