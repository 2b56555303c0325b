"""Evaluation of model variants and the quality-loss report."""
