"""Results: the run store (parquet), summaries and plots."""
