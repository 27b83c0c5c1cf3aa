"""HuBERT iteration-1 targets: MFCC features, their cache, and k-means (per client or federated)."""
