"""Local training: data over manifests and k-means labels, batching, the train/evaluate loop, train-local."""
