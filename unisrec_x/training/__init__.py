"""Lightning wiring: the training modules (next-item, pretraining), checkpoint hand-off, callbacks, result files."""
