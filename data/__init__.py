"""Dataset layouts, Parquet shards and the Ray Data pipeline."""
