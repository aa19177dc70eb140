"""The reconciler: finds work that fell through the cracks of at-least-once delivery and puts it back."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from shared.errors import ChunkStoreUnavailable
from shared.jobs import JobStore

log = logging.getLogger(__name__)


def reconcile(store: JobStore, send: Callable[[str, int], None], *, stale_after: float) -> dict[str, int]:
    """Re-send stale chunks of active jobs; fail jobs whose input stopped arriving. Returns what it did."""
    now = time.time()
    did = {"resent": 0, "fed": 0, "abandoned": 0}
    for job_id in store.active_ids():
        job = store.get(job_id)
        if job is None or job.status.terminal:
            store.forget_active(job_id)
            continue
        read_at = store.last_read_at(job_id)
        if read_at is not None and now - read_at > stale_after:
            log.error("job input stopped arriving; failing the job", extra={"job_id": job_id})
            store.stop(job_id, "fail", "internal_error", "The job's input stopped arriving before it was complete.")
            store.finish_ingest(job_id, job.rows_read, job.chunks_seen)
            did["abandoned"] += 1
            continue
        for index in store.stale_chunks(job_id, now, stale_after):
            log.warning("re-sending a stale chunk", extra={"job_id": job_id, "chunk": index, "model": job.model,
                                                           "version": job.version})
            store.mark_sent(job_id, index)
            send(job_id, index)
            did["resent"] += 1
        for index in store.feed(job_id):  # the window had room (a worker died between commit and send)
            send(job_id, index)
            did["fed"] += 1
    return did


def sweep(store: JobStore) -> int:
    """Remove from the chunk store the blobs of jobs that expired or were deleted; how many jobs were swept."""
    try:
        gone = store.sweep_blobs()
    except ChunkStoreUnavailable as e:
        log.warning("chunk store sweep skipped: %s", e.message)
        return 0
    if gone:
        log.info("blobs of gone jobs removed from the chunk store", extra={"jobs": len(gone)})
    return len(gone)
