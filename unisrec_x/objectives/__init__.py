"""Training objectives: next-item cross-entropy, InfoNCE, sampled softmax, exact micro-batches. Torch only."""
