"""Evaluation: full-ranking metrics (RecBole protocol), bounded-memory ranking, training-free baselines."""
