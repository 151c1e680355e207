"""Stage three: spliced evaluations, model-diff analyses and report tables."""
