"""One job across workers on two hosts: which host committed how many chunks and rows, and the wall time.

    sudo .venv/bin/python bench/hosts.py [--rows N] [--chunk-size ROWS] [--concurrency N] [--chunk-store redis|s3]
                                         [--keep]

Hosts are network namespaces on one bridge, built by tests/support/netns.py (so it needs root): Redis, the API
and beat on host a; the Procfile's `worker` line on hosts b and c, each told only REDIS_URL (host a's address)
and its own copy of the models (with `--chunk-store s3`, also CHUNK_STORE_URL: a bucket of moto's S3-compatible
server on host a, and its endpoint). The CSV (bench/batch.py's hgb20 data: 20 features, HistGradientBoosting) is
uploaded to the API as a streamed multipart body; the job is polled to its end; each chunk's committing worker
is read from Redis. Progress goes to stderr, the markdown table to stdout. See bench/README.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: `python bench/hosts.py`
    sys.path.insert(0, str(REPO_ROOT))

import requests

from bench.batch import HGB20, MultipartBody, count_data_rows, generate_csv, install_hgb20, log
from shared import keys
from tests.support import netns
from tests.support.processes import wait_for

TERMINAL = {"succeeded", "partially_succeeded", "failed", "cancelled"}
WORKER_HOSTS = ("b", "c")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--chunk-size", type=int, default=25_000, help="rows per chunk, sent with the job")
    p.add_argument("--concurrency", type=int, default=1, help="WORKER_CONCURRENCY of each host's worker")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--chunk-store", choices=("redis", "s3"), default="redis",
                   help="where chunk blobs go: Redis, or a bucket of moto's S3 server on host a (CHUNK_STORE_URL)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (data, models, logs)")
    return p.parse_args()


def run(args: argparse.Namespace, tmp: Path) -> dict:
    models_a = tmp / "models-a"
    install_hgb20(models_a)
    data = tmp / "rows.csv"
    log(f"writing {args.rows} rows to {data}")
    generate_csv(data, HGB20, [f"f{i}" for i in range(20)], args.rows, args.seed)
    rows = count_data_rows(data)

    settings = {"WORKER_CONCURRENCY": str(args.concurrency), "HEARTBEAT_INTERVAL": "1"}
    with netns.Cluster(tmp / "cluster", str(models_a), settings, worker_hosts=WORKER_HOSTS,
                       chunk_store=args.chunk_store) as cluster:
        log(f"host a {cluster.host_a.address}: redis pid {cluster.redis.pid}, api {cluster.api.url}")
        if cluster.moto is not None:
            log(f"host a: moto pid {cluster.moto.pid} at {cluster.moto.url}, CHUNK_STORE_URL={cluster.chunk_store_url}")
        workers = {}
        for host in WORKER_HOSTS:
            copy = tmp / f"models-{host}"
            shutil.copytree(models_a, copy)
            workers[host] = cluster.worker(host, str(copy))
        cluster.wait_consuming(list(workers.values()))
        for host, proc in workers.items():
            log(f"host {host} {cluster.network.hosts[host].address}: {proc.name} (pid {proc.pid})")

        body = MultipartBody(data, {"model": HGB20, "chunk_size": str(args.chunk_size)})
        log(f"uploading {body.length / 2**20:.1f} MiB to POST /v1/jobs")
        response = requests.post(f"{cluster.api.url}/v1/jobs", data=body, timeout=(30, 3600),
                                 headers={**cluster.headers(), "Content-Type": body.content_type})
        accepted = time.perf_counter()
        if response.status_code != 202:
            raise SystemExit(f"POST /v1/jobs -> {response.status_code}: {response.text[:500]}")
        job_id = response.json()["id"]

        def finished():
            job = requests.get(f"{cluster.api.url}/v1/jobs/{job_id}", headers=cluster.headers("admin"),
                               timeout=30).json()
            return job if job["status"] in TERMINAL else None

        job = wait_for(finished, timeout=3600, interval=0.2, what=f"job {job_id} to finish")
        ended = time.perf_counter()
        r = cluster.redis.client()
        committed = {int(k): v.decode() for k, v in r.hgetall(keys.committers(job_id)).items()}
        sizes = {int(k): int(v) for k, v in r.hgetall(keys.chunks(job_id)).items()}
        redis_bytes = sum(r.memory_usage(k) or 0 for k in keys.all_job_keys(job_id) if r.exists(k))
        r.close()
        objects = cluster.objects(job_id) if cluster.moto is not None else None
        return {"rows": rows, "job": job, "committed": committed, "sizes": sizes, "workers": workers,
                "upload_s": accepted - body.first_byte_at, "wall_s": ended - body.first_byte_at,
                "redis_bytes": redis_bytes, "objects": objects}


def report(args: argparse.Namespace, out: dict) -> str:
    job, committed, sizes = out["job"], out["committed"], out["sizes"]
    lines = [f"{out['rows']:,} rows, chunk_size {args.chunk_size:,} ({len(sizes)} chunks), hgb20 (20 features), "
             f"the Procfile's worker with WORKER_CONCURRENCY={args.concurrency} on each of {len(out['workers'])} "
             f"hosts; chunk blobs in {'Redis' if args.chunk_store == 'redis' else 'S3 (moto on host a)'}; "
             f"{os.cpu_count()} CPUs shared by every host.", "",
             "| host | worker | chunks | rows | share of rows |", "|---|---|---:|---:|---:|"]
    for host, proc in out["workers"].items():
        mine = [i for i, name in committed.items() if name == proc.name]
        n = sum(sizes[i] for i in mine)
        lines.append(f"| {host} | `{proc.name}` | {len(mine)} | {n:,} | {n / out['rows']:.1%} |")
    lines.append(f"| all | | {len(committed)} | {sum(sizes[i] for i in committed):,} | |")
    counts = job["counts"]
    lines += ["", f"Job `{job['status']}`: {counts['succeeded']:,} succeeded, {counts['failed']} failed, "
              f"{counts['skipped']} skipped of {counts['total']:,}.",
              f"Wall time from the upload's first byte: {out['upload_s']:.1f} s to the 202, {out['wall_s']:.1f} s "
              f"to `{job['status']}` ({out['rows'] / out['wall_s']:,.0f} rows/s).",
              f"The job's Redis keys at the end (MEMORY USAGE): {out['redis_bytes']:,} bytes."]
    if out["objects"] is not None:
        lines[-1] += (f" Its objects in the bucket: {len(out['objects'])}, "
                      f"{sum(out['objects'].values()):,} bytes.")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    reason = netns.unavailable_reason()
    if reason:
        raise SystemExit(f"bench/hosts.py builds hosts with network namespaces and cannot here: {reason}")
    tmp = Path(tempfile.mkdtemp(prefix="predq-hosts-"))
    try:
        out = run(args, tmp)
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(report(args, out))


if __name__ == "__main__":
    main()
