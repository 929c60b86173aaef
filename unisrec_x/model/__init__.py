"""UniSRec's parts: whitening experts, MoE adapter, causal sequence encoder. Torch only."""
