"""Evaluation: generation, ROUGE and BERTScore per language, the paper's results table."""
