"""SID construction: item embeddings -> residual quantization -> collision-free SIDs (`python -m sid.index`)."""
