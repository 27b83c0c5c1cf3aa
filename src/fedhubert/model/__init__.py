"""HuBERT on torchaudio: presets, building, gradient checkpointing, checkpoints and the S3PRL export."""
