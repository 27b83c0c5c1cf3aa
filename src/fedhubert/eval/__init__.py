"""Downstream evaluation with S3PRL (SUPERB keyword spotting on Speech Commands v0.01) and the run report."""
