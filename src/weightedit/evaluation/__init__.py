"""Evaluation: judges, metrics, reports and plots."""
