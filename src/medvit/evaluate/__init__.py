"""Evaluation: predictions on new inputs, fold splits and the figures of reports."""
