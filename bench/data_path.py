#!/usr/bin/env python3
"""Data path benchmark: internal PUT/GET throughput of 256 MiB objects on a 6-node,
3-zone cluster on this machine, as ratios of the protocol pipeline benchmark measured in
the same run, and the peak resident memory of the gateway node during a 2 GiB put.

Usage: python3 bench/data_path.py [--objects 3] [--big-gib 2]
Goals (issue 4): put >= 0.5 and get >= 0.6 of the single-thread pipeline; peak RSS <= 256 MiB.
Loopback only; every process it starts is stopped when it ends.
"""
import argparse, sys, time

from cluster import MIB, Cluster, build_release, cpu_seconds, pipeline_mb_per_s, warm_memory


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, default=3)
    parser.add_argument("--big-gib", type=float, default=2.0)
    args = parser.parse_args()
    build_release()
    warm_memory()
    pipeline = pipeline_mb_per_s()
    cluster = Cluster()
    try:
        cluster.wait_until_up()
        cluster.create_bucket("bench")
        gateway = cluster.nodes[0]

        # Peak memory first, while the process's high-water mark is still its start-up one.
        big = int(args.big_gib * 1024 * MIB)
        start = time.time()
        gateway.put("bench", "big", big)
        big_seconds = time.time() - start
        peak = gateway.peak_rss_bytes()

        size = 256 * MIB
        pids = [node.process.pid for node in cluster.nodes]
        put_seconds = get_seconds = 0.0
        cpu_before_put = cpu_seconds(pids)
        for index in range(args.objects):
            start = time.time()
            gateway.put("bench", f"o{index}", size)
            put_seconds += time.time() - start
        cpu_before_get = cpu_seconds(pids)
        for index in range(args.objects):
            start = time.time()
            received = gateway.get_length("bench", f"o{index}")
            assert received == size, received
            get_seconds += time.time() - start
        cpu_after_get = cpu_seconds(pids)
        megabytes = args.objects * size / 1e6
        put_rate = megabytes / put_seconds
        get_rate = megabytes / get_seconds
        print(f"protocol pipeline (1 thread):     {pipeline:8.1f} MB/s  ({1000 / pipeline:.2f} ms of CPU per MB)")
        print(f"cluster PUT 256 MiB objects:      {put_rate:8.1f} MB/s  ratio {put_rate / pipeline:.2f} (goal >= 0.5)")
        print(f"cluster GET 256 MiB objects:      {get_rate:8.1f} MB/s  ratio {get_rate / pipeline:.2f} (goal >= 0.6)")
        # CPU per MB summed over all six nodes: what the cluster costs, whatever else the
        # machine was doing (the throughputs above are bounded by it on two cores).
        print(f"node CPU per MB: PUT {(cpu_before_get - cpu_before_put) / megabytes * 1000:.2f} ms, "
              f"GET {(cpu_after_get - cpu_before_get) / megabytes * 1000:.2f} ms")
        print(f"{args.big_gib:.1f} GiB put: {big / big_seconds / 1e6:.1f} MB/s, gateway peak RSS {peak / MIB:.0f} MiB (goal <= 256)")
    finally:
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
