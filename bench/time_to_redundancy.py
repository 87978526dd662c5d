#!/usr/bin/env python3
"""Repair benchmark (issue 7): time to full redundancy after losing a node that held N GiB
of shards, against the bound lost bytes x k / aggregate bandwidth, both measured in this
run on a 6-node, 3-zone cluster on this machine.

Rebuilding one lost shard means reading k surviving shards of its stripe, so rebuilding
L lost bytes reads k x L bytes at least. The aggregate bandwidth is measured by reading
every object at once through every surviving node (that path also fetches, verifies,
decrypts and hashes k shards per stripe, as repair does). Repair time is counted from the
moment the cluster reports the node down (detection is `down_after`, a setting) until
`admin status` shows every stripe healthy again.

Usage: python3 bench/time_to_redundancy.py [--gib 4] [--object-mib 256]
Goal: repair time <= 1.3 x the bound. Loopback only; every process it starts is stopped.
"""
import argparse, sys, threading, time

from cluster import MIB, Cluster, build_release

DATA_SHARDS = 4  # the default codec, 4+2
MAINTENANCE = '[maintenance]\nrepair_interval = "1s"\nrepair_rate = "0"\n'


def stripe_counts(status):
    stripes = status["maintenance"]["stripes"]
    return tuple(stripes[name] for name in ("total", "healthy", "degraded", "at_risk", "lost"))


def wait_until_healthy(node, expected_stripes, timeout_s, timeline=None):
    """Polls `admin status` until every stripe is healthy; appends (time, healthy stripes,
    queued stripes, repair bytes/s) to `timeline` on each poll."""
    deadline = time.time() + timeout_s
    last = None
    while time.time() < deadline:
        status = node.status()
        if status:
            last = stripe_counts(status)
            if timeline is not None:
                repair = status["maintenance"]["repair"]
                timeline.append((time.time(), last[1], repair["queued_stripes"], repair["bytes_per_s"]))
            if last == (expected_stripes, expected_stripes, 0, 0, 0) and not status["maintenance"]["nodes_unreachable"]:
                return time.time()
        time.sleep(0.2)
    raise RuntimeError(f"not healthy within {timeout_s} s; last stripe counts {last}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=4.0, help="object data written before the loss")
    parser.add_argument("--object-mib", type=int, default=256)
    parser.add_argument("--timeline", action="store_true", help="print stripe health while repairing")
    args = parser.parse_args()
    build_release()
    cluster = Cluster(extra_config=MAINTENANCE)
    try:
        cluster.wait_until_up()
        cluster.create_bucket("bench")
        object_bytes = args.object_mib * MIB
        count = max(1, int(args.gib * 1024 / args.object_mib))
        keys = [f"o{index}" for index in range(count)]
        for index, key in enumerate(keys):
            cluster.nodes[index % 5].put("bench", key, object_bytes)
        stripes = sum(-(-object_bytes // (4 * MIB)) for _ in keys)
        wait_until_healthy(cluster.nodes[0], stripes, 600)

        # Aggregate bandwidth: every object read at once, spread over the five survivors.
        survivors = cluster.nodes[:5]
        received = [0] * count
        def read(index):
            received[index] = survivors[index % 5].get_length("bench", keys[index])
        started = time.time()
        threads = [threading.Thread(target=read, args=(index,)) for index in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        read_seconds = time.time() - started
        assert all(length == object_bytes for length in received), received
        bandwidth = count * object_bytes / read_seconds

        victim = cluster.nodes[5]
        victim_id = victim.status()["node_id"]
        lost_bytes = victim.shard_bytes()
        killed = time.time()
        victim.kill()
        detected = None
        while detected is None:
            status = cluster.nodes[0].status()
            if status and any(n["id"] == victim_id and n["state"] == "down" for n in status["nodes"]):
                detected = time.time()
            else:
                time.sleep(0.1)
        timeline = []
        healthy = wait_until_healthy(cluster.nodes[0], stripes, 1800, timeline)
        repair_seconds = healthy - detected
        bound_seconds = lost_bytes * DATA_SHARDS / bandwidth
        print(f"objects: {count} x {args.object_mib} MiB ({stripes} stripes of 4+2)")
        print(f"aggregate read bandwidth:  {bandwidth / 1e6:8.1f} MB/s ({count} objects read at once through 5 nodes)")
        print(f"lost with the node:        {lost_bytes / MIB:8.1f} MiB of shards")
        print(f"detection (down_after):    {detected - killed:8.1f} s")
        print(f"repair to full redundancy: {repair_seconds:8.1f} s")
        print(f"bound (lost x k / bw):     {bound_seconds:8.1f} s")
        print(f"ratio repair / bound:      {repair_seconds / bound_seconds:8.2f} (goal <= 1.3)")
        if args.timeline:
            print("timeline after detection (s, healthy stripes, queued stripes, repair MB/s summed):")
            for at, healthy_stripes, queued, rate in timeline:
                print(f"  {at - detected:6.1f} {healthy_stripes:6d} {queued:6d} {rate / 1e6:8.1f}")
    finally:
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
