"""gdn-exp: an experiment runner for Gated DeltaNet research."""
