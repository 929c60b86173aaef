"""Serving a trained model: the Recommender, model directories and exports, the HTTP service, the shell commands."""
