"""Stage two: shuffled, aligned loaders and SAE / crosscoder training from the store."""
