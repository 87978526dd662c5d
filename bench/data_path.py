#!/usr/bin/env python3
"""Data path benchmark: internal PUT/GET throughput of 256 MiB objects on a 6-node,
3-zone cluster on this machine, as ratios of the protocol pipeline benchmark measured in
the same run, and the peak resident memory of the gateway node during a 2 GiB put.

Usage: python3 bench/data_path.py [--objects 3] [--big-gib 2]
Goals (issue 4): put >= 0.5 and get >= 0.6 of the single-thread pipeline; peak RSS <= 256 MiB.
Loopback only; every process it starts is stopped when it ends.
"""
import argparse, http.client, json, os, re, signal, socket, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, "target", "release", "bdr-node")
MIB = 1024 * 1024


def free_port(kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pipeline_mb_per_s():
    out = subprocess.run(["cargo", "bench", "-p", "bdr-protocol"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    match = re.search(r"pipeline hash -> seal -> encode, 1 thread\s+([\d.]+) MB/s", out)
    return float(match.group(1))


class Node:
    def __init__(self, root, index, zone, secret, data_key, bootstrap):
        self.folder = os.path.join(root, f"node{index}")
        os.makedirs(self.folder)
        self.tcp, self.quic, self.admin, self.s3 = free_port(), free_port(socket.SOCK_DGRAM), free_port(), free_port()
        boot = ", ".join(f'"{b}"' for b in bootstrap)
        with open(os.path.join(self.folder, "node.toml"), "w") as f:
            f.write(f'data_dir = "data"\nzone = "{zone}"\ncapacity = "200 GiB"\n'
                    f'listen = ["/ip4/127.0.0.1/tcp/{self.tcp}", "/ip4/127.0.0.1/udp/{self.quic}/quic-v1"]\n'
                    f'bootstrap = [{boot}]\ncluster_secret_file = "{secret}"\ndata_key_file = "{data_key}"\n'
                    f'down_after = "5s"\ngossip_interval = "250ms"\n[s3]\nlisten = "127.0.0.1:{self.s3}"\n'
                    f'[admin]\nlisten = "127.0.0.1:{self.admin}"\n')
        log = open(os.path.join(self.folder, "node.log"), "w")
        self.process = subprocess.Popen([BINARY, "run", "--config", os.path.join(self.folder, "node.toml")],
                                        stdout=log, stderr=log)

    def token(self):
        with open(os.path.join(self.folder, "data", "admin.token")) as f:
            return f.read().strip()

    def request(self, method, path, body=None, length=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.admin, timeout=600)
        headers = {"Authorization": f"Bearer {self.token()}"}
        if length is not None:
            headers["Content-Length"] = str(length)
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response, conn

    def peak_rss_bytes(self):
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0


def generated(total_bytes, chunk=MIB):
    block = os.urandom(chunk)
    sent = 0
    while sent < total_bytes:
        piece = block[: min(chunk, total_bytes - sent)]
        sent += len(piece)
        yield piece


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, default=3)
    parser.add_argument("--big-gib", type=float, default=2.0)
    args = parser.parse_args()
    subprocess.run(["cargo", "build", "--release", "-p", "bdr-node"], cwd=ROOT, check=True)
    pipeline = pipeline_mb_per_s()
    root = tempfile.mkdtemp(prefix="bdr-bench-")
    secret, data_key = os.path.join(root, "secret"), os.path.join(root, "data.key")
    for path in (secret, data_key):
        with open(path, "w") as f:
            f.write(subprocess.run([BINARY, "gen-secret"], capture_output=True, text=True, check=True).stdout)
    nodes = []
    try:
        for index, zone in enumerate(["a", "a", "b", "b", "c", "c"]):
            bootstrap = [f"/ip4/127.0.0.1/tcp/{n.tcp}" for n in nodes[:2]]
            nodes.append(Node(root, index, zone, secret, data_key, bootstrap))
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                response, conn = nodes[0].request("GET", "/v1/status")
                status = json.loads(response.read())
                conn.close()
                if len(status["nodes"]) == 6 and all(n["state"] == "up" for n in status["nodes"]):
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.3)
        gateway = nodes[0]
        response, conn = gateway.request("PUT", "/v1/buckets/bench")
        response.read(); conn.close()

        # Peak memory first, while the process's high-water mark is still its start-up one.
        big = int(args.big_gib * 1024 * MIB)
        start = time.time()
        response, conn = gateway.request("PUT", "/v1/objects/bench/big", body=generated(big), length=big)
        assert response.status == 200, response.read()
        response.read(); conn.close()
        big_seconds = time.time() - start
        peak = gateway.peak_rss_bytes()

        size = 256 * MIB
        put_seconds = get_seconds = 0.0
        for index in range(args.objects):
            start = time.time()
            response, conn = gateway.request("PUT", f"/v1/objects/bench/o{index}", body=generated(size), length=size)
            assert response.status == 200, response.read()
            response.read(); conn.close()
            put_seconds += time.time() - start
        for index in range(args.objects):
            start = time.time()
            response, conn = gateway.request("GET", f"/v1/objects/bench/o{index}")
            received = 0
            while True:
                piece = response.read(4 * MIB)
                if not piece:
                    break
                received += len(piece)
            conn.close()
            assert received == size, received
            get_seconds += time.time() - start
        put_rate = args.objects * size / put_seconds / 1e6
        get_rate = args.objects * size / get_seconds / 1e6
        print(f"protocol pipeline (1 thread):     {pipeline:8.1f} MB/s")
        print(f"cluster PUT 256 MiB objects:      {put_rate:8.1f} MB/s  ratio {put_rate / pipeline:.2f} (goal >= 0.5)")
        print(f"cluster GET 256 MiB objects:      {get_rate:8.1f} MB/s  ratio {get_rate / pipeline:.2f} (goal >= 0.6)")
        print(f"{args.big_gib:.1f} GiB put: {big / big_seconds / 1e6:.1f} MB/s, gateway peak RSS {peak / MIB:.0f} MiB (goal <= 256)")
    finally:
        for node in nodes:
            node.process.send_signal(signal.SIGKILL)
            node.process.wait()


if __name__ == "__main__":
    sys.exit(main())
