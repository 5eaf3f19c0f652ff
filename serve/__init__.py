"""Embedding engine and service (``priorclip.serve``)."""
