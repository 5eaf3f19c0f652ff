"""Trainer, losses and training data (``priorclip.training``)."""
