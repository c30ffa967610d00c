#!/usr/bin/env python3
"""Where the CPU goes, from a `perf record -g` of runner-bench (frame pointers needed).

    perf script -i perf.data -F comm,tid,period,ip,sym,dso | bench/scripts/perf_shares.py

Prints, per thread group (shard, bridge, nats-server, ...), its share of all samples, and
for the runner's threads the share of each component: a sample counts for the first
component (in the order below) found anywhere on its stack, so "LMDB commit" includes
the fsync below it and "program engine" includes rhai's own allocations; then the same
samples by their leaf frame (allocator, memcpy, kernel, ...). libc has no frame pointers,
so a sample inside malloc may lose its callers and land in "other".
"""
import re
import sys
from collections import Counter, defaultdict

# (component, pattern on any frame of a sample's stack): the first match wins, so the
# order goes from specific to general.
COMPONENTS = [
    ("relay: outbox rescan (LMDB read + JSON decode of outbox items)", r"RelayState::scan"),
    ("program engine (rhai call, event/state conversion)", r"shards::program::Programs::run|event_dynamic|rhai::"),
    (
        "LMDB commit (page writes, fsync, block I/O)",
        r"_mdb_txn_commit|mdb_env_sync|fdatasync|do_fsync|fsync|submit_bio|blk_mq|virtqueue|folio_wait_writeback",
    ),
    ("LMDB reads and puts", r"\bmdb_|heed::"),
    ("serde (JSON encode/decode of records, envelopes)", r"serde|to_raw_value|format_escaped_str"),
    ("work and timer ids (sha1)", r"shards::ids::"),
    (
        "pipeline bookkeeping (batch staging, answers, relay window, dispatch results)",
        r"shards::pipeline|shards::core|shards::shell|shards::relay|shards::store|shards::shard",
    ),
    ("NATS client (async-nats)", r"async_nats::"),
    ("decode / route / settle (bridge)", r"runner::bridge::ingest|runner::envelope"),
    ("dispatch (bridge)", r"runner::bridge::dispatch"),
    ("wakeups and sleeping (futex, eventfd, io_uring, scheduler)", r"futex|eventfd|io_uring|__schedule|membarrier|epoll"),
    ("channels and executors (flume, glommio, tokio)", r"flume::|glommio::|tokio::|futures_"),
]

# (kind, pattern on the leaf frame): where the time is spent, whoever called it.
LEAVES = [
    ("allocator (malloc/free)", r"malloc|_int_free|cfree|calloc|realloc|_int_realloc|\bmi_|_mi_"),
    ("memcpy/memmove", r"memmove|memcpy|memset"),
    ("kernel", r"\[kernel|\(\[kernel|^[0-9a-f]+ [a-z_0-9.]+ \(\[kernel"),
    ("LMDB", r"\bmdb_"),
    ("serde", r"serde"),
    ("rhai", r"rhai::"),
]


def group(comm):
    if comm.startswith("shard-"):
        return "shard"
    if comm.startswith("flush-"):
        return "flush"
    return comm


def main():
    per_group = Counter()
    per_comp = defaultdict(Counter)
    per_leaf = defaultdict(Counter)
    total = 0
    comm, stack = None, []

    def flush():
        nonlocal total
        if comm is None:
            return
        g = group(comm)
        per_group[g] += 1
        total += 1
        comp = "other"
        for name, pat in COMPONENTS:
            if any(re.search(pat, f) for f in stack):
                comp = name
                break
        per_comp[g][comp] += 1
        leaf = "other"
        for name, pat in LEAVES:
            if stack and re.search(pat, stack[0]):
                leaf = name
                break
        per_leaf[g][leaf] += 1

    for line in sys.stdin:
        if not line.strip():
            flush()
            comm, stack = None, []
        elif not line.startswith(("\t", " ")):
            flush()
            comm, stack = line.split()[0], []
        else:
            parts = line.strip().split(" ", 1)
            stack.append(line.strip())
    flush()
    print(f"{total} samples")
    for g, n in per_group.most_common():
        print(f"{g:20} {100 * n / total:5.1f}% of all samples")
    for g in ("shard", "bridge"):
        n = per_group.get(g, 0)
        if not n:
            continue
        print(f"\n{g} threads ({n} samples):")
        for comp, c in per_comp[g].most_common():
            print(f"  {100 * c / n:5.1f}%  {comp}")
        print("  by leaf frame:", ", ".join(f"{k} {100 * c / n:.1f}%" for k, c in per_leaf[g].most_common()))


if __name__ == "__main__":
    main()
