"""ingestd: records crypto exchanges' real-time market data as partitioned Parquet."""

__version__ = "0.1.0"
