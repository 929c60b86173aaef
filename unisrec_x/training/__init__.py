"""Lightning wiring: training modules, checkpoint hand-off, result files."""
