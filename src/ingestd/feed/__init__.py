"""Per-feed connection management: backoff, REST fetches, intake, and the reader task."""
