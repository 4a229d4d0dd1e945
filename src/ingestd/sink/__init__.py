"""The sink: batching rows, committing Parquet files atomically, the writer task."""
