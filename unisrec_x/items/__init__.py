"""How an item becomes model input: the frozen text encoder, the cache of its vectors, semantic item codes."""
