"""Fairness adaptors, their trainers and the generation core they share."""
