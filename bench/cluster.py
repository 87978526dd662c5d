"""A local multi-process bdr cluster for the benchmarks under bench/: release `bdr-node`
processes on loopback, each with its own folder, config and admin API. Every process it
starts is SIGKILLed by `Cluster.stop` (call it in a `finally`)."""
import http.client, json, os, re, shutil, signal, socket, subprocess, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, "target", "release", "bdr-node")
MIB = 1024 * 1024
ZONES_SIX = ["a", "a", "b", "b", "c", "c"]


def free_port(kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_release():
    subprocess.run(["cargo", "build", "--release", "-p", "bdr-node"], cwd=ROOT, check=True)


def pipeline_mb_per_s():
    """The protocol crate's single-thread hash -> seal -> encode pipeline, MB/s."""
    out = subprocess.run(["cargo", "bench", "-p", "bdr-protocol"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    match = re.search(r"pipeline hash -> seal -> encode, 1 thread\s+([\d.]+) MB/s", out)
    return float(match.group(1))


def warm_memory(keep_free_bytes=2 * 1024 * MIB):
    """Touches most free memory once. On a VM whose memory the host backs lazily (this
    workplace's), the first write to a page costs ~10x a later one: page-cache copies ran
    at 0.45 GB/s on fresh memory and 5 GB/s on memory touched before, which made the
    first benchmark of a fresh machine look twice as slow as the next."""
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    size = max(0, available - keep_free_bytes)
    if size < MIB:
        return
    import mmap
    region = mmap.mmap(-1, size)
    block = b"\x01" * MIB
    for offset in range(0, size - MIB + 1, MIB):
        region[offset:offset + MIB] = block
    region.close()


def cpu_seconds(pids):
    """User + system CPU seconds used so far by the processes `pids`."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def generated(total_bytes, chunk=MIB):
    """`total_bytes` of incompressible data, streamed in `chunk`s."""
    block = os.urandom(chunk)
    sent = 0
    while sent < total_bytes:
        piece = block[: min(chunk, total_bytes - sent)]
        sent += len(piece)
        yield piece


class Node:
    def __init__(self, root, index, zone, secret, data_key, bootstrap, extra_config=""):
        self.folder = os.path.join(root, f"node{index}")
        os.makedirs(self.folder)
        self.tcp, self.quic, self.admin, self.s3 = free_port(), free_port(socket.SOCK_DGRAM), free_port(), free_port()
        boot = ", ".join(f'"{b}"' for b in bootstrap)
        with open(os.path.join(self.folder, "node.toml"), "w") as f:
            f.write(f'data_dir = "data"\nzone = "{zone}"\ncapacity = "200 GiB"\n'
                    f'listen = ["/ip4/127.0.0.1/tcp/{self.tcp}", "/ip4/127.0.0.1/udp/{self.quic}/quic-v1"]\n'
                    f'bootstrap = [{boot}]\ncluster_secret_file = "{secret}"\ndata_key_file = "{data_key}"\n'
                    f'down_after = "5s"\ngossip_interval = "250ms"\n[s3]\nlisten = "127.0.0.1:{self.s3}"\n'
                    f'[admin]\nlisten = "127.0.0.1:{self.admin}"\n{extra_config}')
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

    def status(self):
        """`GET /v1/status` as JSON, or None while the node cannot answer."""
        try:
            response, conn = self.request("GET", "/v1/status")
            status = json.loads(response.read())
            conn.close()
            return status
        except (OSError, ValueError):
            return None

    def put(self, bucket, key, size_bytes):
        response, conn = self.request("PUT", f"/v1/objects/{bucket}/{key}", body=generated(size_bytes), length=size_bytes)
        body = response.read()
        conn.close()
        assert response.status == 200, body

    def get_length(self, bucket, key):
        """Reads an object to the end; returns how many bytes came."""
        response, conn = self.request("GET", f"/v1/objects/{bucket}/{key}")
        assert response.status == 200, response.read()
        received = 0
        while True:
            piece = response.read(4 * MIB)
            if not piece:
                break
            received += len(piece)
        conn.close()
        return received

    def shard_bytes(self):
        """Bytes of shard files on this node's disk."""
        total = 0
        for folder, _, files in os.walk(os.path.join(self.folder, "data", "shards", "shards")):
            total += sum(os.path.getsize(os.path.join(folder, name)) for name in files)
        return total

    def peak_rss_bytes(self):
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0

    def kill(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


class Cluster:
    """`len(zones)` nodes, node i in `zones[i]`; every node is a gateway."""

    def __init__(self, zones=ZONES_SIX, extra_config=""):
        self.root = tempfile.mkdtemp(prefix="bdr-bench-")
        secret, data_key = os.path.join(self.root, "secret"), os.path.join(self.root, "data.key")
        for path in (secret, data_key):
            with open(path, "w") as f:
                f.write(subprocess.run([BINARY, "gen-secret"], capture_output=True, text=True, check=True).stdout)
        self.nodes = []
        for index, zone in enumerate(zones):
            bootstrap = [f"/ip4/127.0.0.1/tcp/{n.tcp}" for n in self.nodes[:2]]
            self.nodes.append(Node(self.root, index, zone, secret, data_key, bootstrap, extra_config))

    def wait_until_up(self, timeout_s=90):
        """Until node 0 sees every node up with its metadata in hand."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            status = self.nodes[0].status()
            if status and len(status["nodes"]) == len(self.nodes) and all(
                    n["state"] == "up" and n.get("metadata_synced", True) for n in status["nodes"]):
                return
            time.sleep(0.3)
        raise RuntimeError(f"cluster did not come up within {timeout_s} s (logs under {self.root})")

    def create_bucket(self, name):
        response, conn = self.nodes[0].request("PUT", f"/v1/buckets/{name}")
        body = response.read()
        conn.close()
        assert response.status == 201, body

    def stop(self):
        for node in self.nodes:
            node.kill()
        shutil.rmtree(self.root, ignore_errors=True)
