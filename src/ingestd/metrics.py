"""Prometheus exposition of ingestd's counters (prometheus_client, custom collector).

Owns: the `ingestd_*` metric families, built at scrape time from one frozen
`DaemonSnapshot` (feeds, queue, writer, journal, object store, event loop) taken from the snapshot
source the daemon hands over, so the hot path only bumps plain integers.

Must not: keep state of its own, import the daemon, or be called per message.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ingestd import __version__
from ingestd.stats import SnapshotSource

BREAKER_VALUE = {"closed": 0.0, "half_open": 1.0, "open": 2.0}
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class SnapshotCollector(Collector):
    def __init__(self, source: SnapshotSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        snap = self.source()
        labels = ["feed", "exchange"]
        info = GaugeMetricFamily("ingestd_info", "ingestd version", labels=["version"])
        info.add_metric([__version__], 1.0)
        yield info

        up = GaugeMetricFamily("ingestd_feed_up", "1 while the feed is streaming", labels=labels)
        breaker = GaugeMetricFamily("ingestd_breaker_state",
                                    "circuit breaker: 0 closed, 1 half_open, 2 open",
                                    labels=labels)
        age = GaugeMetricFamily("ingestd_last_message_age_seconds",
                                "seconds since the feed's last frame", labels=labels)
        frames = CounterMetricFamily("ingestd_frames", "frames received", labels=labels)
        nbytes = CounterMetricFamily("ingestd_received_bytes", "bytes received", labels=labels)
        reconnects = CounterMetricFamily("ingestd_reconnects", "reconnections", labels=labels)
        gaps = CounterMetricFamily("ingestd_gaps", "sequence gaps detected", labels=labels)
        resyncs = CounterMetricFamily("ingestd_resyncs", "book resyncs", labels=labels)
        stale = CounterMetricFamily("ingestd_stale", "stale streams detected", labels=labels)
        unknown = CounterMetricFamily("ingestd_unknown_messages", "messages of unknown types",
                                      labels=labels)
        errors = CounterMetricFamily("ingestd_parse_errors", "frames rejected (kept raw)",
                                     labels=[*labels, "reason"])
        drops = CounterMetricFamily("ingestd_drops", "rows or frames dropped, by reason",
                                    labels=[*labels, "reason"])
        rows = CounterMetricFamily("ingestd_rows", "rows handed to the writer",
                                   labels=[*labels, "table"])
        polls = CounterMetricFamily("ingestd_polls", "periodic REST poll answers, by "
                                    "outcome (ok, http_<status>, timeout, ...)",
                                    labels=[*labels, "outcome"])
        for st in snap.feeds:
            lv = [st.name, st.exchange]
            up.add_metric(lv, 1.0 if st.state == "streaming" else 0.0)
            breaker.add_metric(lv, BREAKER_VALUE.get(st.breaker, 2.0))
            if st.last_message_age_s is not None:
                age.add_metric(lv, max(0.0, st.last_message_age_s))
            frames.add_metric(lv, st.messages)
            nbytes.add_metric(lv, st.bytes)
            reconnects.add_metric(lv, st.reconnects)
            gaps.add_metric(lv, st.gaps)
            resyncs.add_metric(lv, st.resyncs)
            stale.add_metric(lv, st.stale)
            unknown.add_metric(lv, st.unknown_messages)
            for reason, n in sorted(st.parse_errors):
                errors.add_metric([*lv, reason], n)
            for reason, n in sorted(st.drops):
                drops.add_metric([*lv, reason], n)
            for table, n in sorted(st.rows):
                rows.add_metric([*lv, table], n)
            for outcome, n in sorted(st.polls):
                polls.add_metric([*lv, outcome], n)
        yield from (up, breaker, age, frames, nbytes, reconnects, gaps, resyncs, stale, unknown,
                    errors, drops, rows, polls)

        q = snap.queue
        yield GaugeMetricFamily("ingestd_queue_depth", "messages queued for the writer",
                                value=q.depth)
        yield GaugeMetricFamily("ingestd_queue_capacity", "queue capacity", value=q.capacity)
        yield GaugeMetricFamily("ingestd_queue_peak_depth", "highest depth seen",
                                value=q.peak_depth)
        # The queue's own count of the messages it turned away (`drop_newest`). Each is also
        # in ingestd_drops{feed,reason="queue_full"}, with its rows and rejects; this one
        # survives the removal of a feed by a reload.
        qdropped = CounterMetricFamily("ingestd_queue_dropped",
                                       "messages the full queue turned away, by reason",
                                       labels=["reason"])
        for reason, n in sorted(q.dropped):
            qdropped.add_metric([reason], n)
        yield qdropped

        w = snap.writer
        written = CounterMetricFamily("ingestd_rows_written", "rows committed to Parquet",
                                      labels=["table"])
        for table, n in sorted(w.rows_written):
            written.add_metric([table], n)
        yield written
        yield CounterMetricFamily("ingestd_files_written", "Parquet files committed",
                                  value=w.files_written)
        yield CounterMetricFamily("ingestd_written_bytes", "Parquet bytes committed",
                                  value=w.bytes_written)
        yield CounterMetricFamily("ingestd_flush_errors", "failed commits (retried)",
                                  value=w.flush_errors)
        yield GaugeMetricFamily("ingestd_writer_healthy",
                                "1 while commits succeed and every committed file is durable",
                                value=1.0 if w.healthy else 0.0)
        yield CounterMetricFamily("ingestd_dir_fsync_failures",
                                  "directory syncs that failed after a file was published "
                                  "(only the sync is retried, never the rows)",
                                  value=w.dir_fsync_failures)
        yield GaugeMetricFamily("ingestd_unsynced_dirs",
                                "partition directories with published files not yet durable",
                                value=w.unsynced_dirs)
        yield CounterMetricFamily("ingestd_rejects_written", "rejected frames kept raw",
                                  value=w.rejects_written)
        yield CounterMetricFamily("ingestd_rejects_lost",
                                  "rejected frames whose write to .rejects/ failed",
                                  value=w.rejects_lost)
        yield CounterMetricFamily("ingestd_rejects_deleted",
                                  "files deleted from .rejects/ to stay within its budget",
                                  value=w.rejects_deleted)
        yield GaugeMetricFamily("ingestd_rejects_bytes", "bytes under .rejects/",
                                value=w.rejects_bytes)
        yield GaugeMetricFamily("ingestd_buffered_rows", "rows buffered, not yet committed",
                                value=w.buffered_rows)
        yield HistogramMetricFamily(
            "ingestd_flush_duration_seconds",
            "time from handing a batch to the worker to its commit",
            buckets=[(_le(bound), n) for bound, n in w.flush_histogram],
            sum_value=w.flush_seconds_total)
        yield GaugeMetricFamily("ingestd_event_loop_lag_seconds",
                                "latest event-loop scheduling delay", value=snap.loop_lag_s)
        yield GaugeMetricFamily("ingestd_event_loop_lag_max_seconds",
                                "largest event-loop scheduling delay",
                                value=snap.loop_lag_max_s)

        js = snap.journal
        if js is not None:
            yield GaugeMetricFamily("ingestd_journal_healthy", "1 while journal writes succeed",
                                    value=1.0 if js.healthy else 0.0)
            if js.fsync_age_s is not None:
                yield GaugeMetricFamily("ingestd_journal_fsync_age_seconds",
                                        "seconds since the journal's last fsync",
                                        value=max(0.0, js.fsync_age_s))
            yield GaugeMetricFamily("ingestd_journal_pending_bytes",
                                    "journal bytes not yet durable", value=js.pending_bytes)
            yield CounterMetricFamily("ingestd_journal_bytes", "bytes appended to the journal",
                                      value=js.bytes_appended)
            yield CounterMetricFamily("ingestd_journal_fsync_failures",
                                      "failed journal writes or fsyncs",
                                      value=js.fsync_failures)
            yield GaugeMetricFamily("ingestd_raw_kept_bytes",
                                    "raw frames kept for ingestd replay (bytes)",
                                    value=js.raw_kept_bytes)
            yield CounterMetricFamily("ingestd_raw_deleted",
                                      "kept raw segments deleted by age or size cap",
                                      value=js.raw_deleted)

        ss = snap.store
        if ss is not None:
            yield GaugeMetricFamily("ingestd_store_up",
                                    "1 unless the object store is unreachable (uploads fail)",
                                    value=0.0 if ss.state == "unreachable" else 1.0)
            yield GaugeMetricFamily("ingestd_store_files_waiting",
                                    "committed files waiting in the local outbox for upload",
                                    value=ss.files_waiting)
            yield GaugeMetricFamily("ingestd_store_bytes_waiting",
                                    "bytes waiting in the local outbox for upload",
                                    value=ss.bytes_waiting)
            yield CounterMetricFamily("ingestd_store_files_uploaded",
                                      "files uploaded to the object store",
                                      value=ss.files_uploaded)
            yield CounterMetricFamily("ingestd_store_uploaded_bytes",
                                      "bytes uploaded to the object store",
                                      value=ss.bytes_uploaded)
            yield CounterMetricFamily("ingestd_store_upload_failures",
                                      "failed upload attempts (each retried with backoff)",
                                      value=ss.upload_failures)
            if ss.last_upload_age_s is not None:
                yield GaugeMetricFamily("ingestd_store_last_upload_age_seconds",
                                        "seconds since the last successful upload",
                                        value=max(0.0, ss.last_upload_age_s))


def _le(bound: float) -> str:
    """A bucket's `le` label as prometheus_client writes it (0.005, 1.0, +Inf)."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def registry_for(source: SnapshotSource) -> CollectorRegistry:
    """A registry whose every scrape reads one fresh snapshot from `source`."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SnapshotCollector(source))
    return reg


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
