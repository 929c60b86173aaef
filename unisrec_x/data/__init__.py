"""Reading interaction and text files, building sequences, serving batches."""
