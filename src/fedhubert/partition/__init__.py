"""Speaker-based non-IID partitioning of a LibriSpeech-layout corpus into federated clients."""
