"""Several worker hosts on one machine: network namespaces, each with a link of its own.

    root namespace                                   host namespace medq-<pid>-<tag>-h<i>
    Redis, simulator on 127.0.0.1
      ^ Forwarder per host and port,
      | bound to 10.77.X.(4i+1) ---- veth mq<tag><i>r === mq<tag><i>n ---- 10.77.X.(4i+2)
                                                                          "medq-services" -> 10.77.X.(4i+1)

Redis, PostgreSQL and RabbitMQ listen on 127.0.0.1 only, so each host reaches them through
a :class:`~tests.helpers.Forwarder` in the root namespace bound to its own link's address;
:meth:`Host.cut` cuts that host alone (a partition: its processes keep running, and think
they still hold their jobs). Every host calls the services by one name, ``medq-services``
(``/etc/netns/<ns>/hosts``, which ``ip netns exec`` mounts over ``/etc/hosts``), so the
URLs are the same on every host, as in a real deployment: medq keys an endpoint's shared
limits (in-flight slots, rate) by its URL, and all hosts then share them.

Why a forwarder and not ``ip link set ... down``: with the link down the kernel removes
the root side's route to the host, and replies to it leave by the default route; there
is no ``iptables`` or ``netem`` here to drop packets instead. The forwarder's black hole
keeps every socket open and moves no byte (nor a close) either way, which is what a pulled
cable does to TCP, and :meth:`Host.restore` delivers what waited, as TCP does when the
link comes back. ``how="reset"`` closes the connections instead (a host whose peer died).

Names are unique per run (pid and a random tag) and a run cleans up after earlier runs
that died (namespaces whose pid is gone), so a crashed run never blocks the next.

``python -m tests.hosts bench`` measures jobs/s with 1, 2 and 3 hosts (see :func:`bench`).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tests.helpers import MEDQ, REPO, TEST_REDIS_URL, XDIST_N, Forwarder, Proc, free_port, wait_http, wait_log

SERVICES = "medq-services"  # the name every host calls the root namespace's services by
NETNS_ETC = Path("/etc/netns")
_NS_RE = re.compile(r"^medq-(\d+)-([0-9a-f]{6})-h\d+$")
_VETH_RE = re.compile(r"^mq([0-9a-f]{6})\d+r$")


class HostsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no ``ip``, not permitted)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_names() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines() if line.strip()]


def _kill_netns_pids(ns: str) -> None:
    """SIGKILL what still runs in ``ns`` (it keeps the namespace, and its link, alive)."""
    for pid in _ip("netns", "pids", ns, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _delete_netns(ns: str) -> None:
    _kill_netns_pids(ns)
    _ip("netns", "del", ns, check=False)  # its end of the veth goes with it, and so the pair
    shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


def _rmdir_netns_etc() -> None:
    try:
        NETNS_ETC.rmdir()  # only if empty: nobody else uses it
    except OSError:
        pass


def clean_stale() -> list[str]:
    """Remove what runs that died left behind: namespaces whose pid is gone, and root-side
    links whose namespace is gone. Returns the namespaces removed."""
    gone = []
    names = _netns_names()
    for ns in names:
        m = _NS_RE.match(ns)
        if m and not _alive(int(m[1])):
            _delete_netns(ns)
            gone.append(ns)
    tags = {m[2] for ns in _netns_names() if (m := _NS_RE.match(ns))}
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        m = _VETH_RE.match(name)
        if m and m[1] not in tags:
            _ip("link", "del", name, check=False)
    _rmdir_netns_etc()
    return gone


def netns_problem() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "no `ip` command (apt-get install iproute2)"
    probe = f"medq-{os.getpid()}-{secrets.token_hex(3)}-h0"
    res = _ip("netns", "add", probe, check=False)
    if res.returncode != 0:
        return f"`ip netns add` is not permitted here: {res.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.77.X.0/24 no address of the root namespace is in. Each pytest-xdist worker looks
    from its own place (X = 32 n ...): two tests looking at once would otherwise both take
    the first free one."""
    used = set()
    for line in _ip("-o", "-4", "addr", "show", check=False).stdout.splitlines():
        m = re.search(r"inet (\d+\.\d+\.\d+\.\d+)", line)
        if m:
            used.add(ipaddress.ip_address(m[1]))
    for i in range(256):
        net = ipaddress.IPv4Network(f"10.77.{(32 * XDIST_N + i) % 256}.0/24")
        if not any(a in net for a in used):
            return net
    raise HostsUnavailable("no free 10.77.X.0/24 subnet")


@dataclass
class Host:
    """One worker host: a namespace, its link, and the forwarders on the root side of it."""

    index: int
    ns: str
    veth: str  # root side; the host's side is veth[:-1] + "n"
    root_addr: str  # the root side's address: forwarders bind here
    addr: str  # the host's own address
    forwarders: dict[int, Forwarder] = field(default_factory=dict)  # by port
    cut_how: str | None = None

    def command(self, args: list[str]) -> list[str]:
        """``args`` run inside this host."""
        return ["ip", "netns", "exec", self.ns, *args]

    def cut(self, how: str = "blackhole") -> None:
        """Partition this host: ``blackhole`` (a pulled cable) or ``reset`` (connections closed)."""
        for fw in self.forwarders.values():
            fw.cut(how)
        self.cut_how = how

    def restore(self) -> None:
        for fw in self.forwarders.values():
            fw.restore()
        self.cut_how = None

    @property
    def moved(self) -> int:
        """Bytes forwarded to and from this host so far."""
        return sum(fw.moved for fw in self.forwarders.values())


class Hosts:
    """``n`` hosts; use as a context manager (teardown always runs, on failure too).

    ``reach(url)`` forwards a root-namespace service to every host and returns the URL the
    hosts call it by; ``hosts[i].command(args)`` runs ``args`` in host ``i`` (numbered from 1)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.tag = secrets.token_hex(3)
        self.hosts: list[Host] = []

    def __enter__(self) -> Hosts:
        why = netns_problem()
        if why:
            raise HostsUnavailable(why)
        clean_stale()
        try:
            net = _free_subnet()
            base = int(net.network_address)
            for i in range(1, self.n + 1):
                self._make(i, str(ipaddress.ip_address(base + 4 * i + 1)), str(ipaddress.ip_address(base + 4 * i + 2)))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i - 1]

    def __iter__(self) -> Any:
        return iter(self.hosts)

    def _make(self, i: int, root_addr: str, addr: str) -> None:
        ns = f"medq-{os.getpid()}-{self.tag}-h{i}"
        veth, inner = f"mq{self.tag}{i}r", f"mq{self.tag}{i}n"
        _ip("netns", "add", ns)
        self.hosts.append(Host(i, ns, veth, root_addr, addr))  # from here on, close() removes it
        (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
        (NETNS_ETC / ns / "hosts").write_text(f"127.0.0.1 localhost\n{root_addr} {SERVICES}\n")
        _ip("link", "add", veth, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", ns)
        _ip("addr", "add", f"{root_addr}/30", "dev", veth)
        _ip("link", "set", veth, "up")
        _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", inner)
        _ip("-n", ns, "link", "set", inner, "up")
        _ip("-n", ns, "link", "set", "lo", "up")

    def reach(self, url: str) -> str:
        """``url`` (a service on 127.0.0.1) as the hosts call it: ``medq-services`` instead of
        its host, the same port, forwarded on every host's link."""
        parts = urlsplit(url)
        target = (parts.hostname or "127.0.0.1", parts.port or {"redis": 6379, "http": 80}[parts.scheme])
        for host in self.hosts:
            if target[1] not in host.forwarders:
                host.forwarders[target[1]] = Forwarder((host.root_addr, target[1]), target)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo + '@' if userinfo else ''}{SERVICES}:{target[1]}"
        return urlunsplit(parts._replace(netloc=netloc))

    def close(self) -> None:
        for host in self.hosts:
            for fw in host.forwarders.values():
                fw.close()
            _delete_netns(host.ns)
            _ip("link", "del", host.veth, check=False)  # made but never moved into its namespace
        self.hosts = []
        _rmdir_netns_etc()


# ------------------------------------------------------------------ bench


def _start(args: list[str], env: dict[str, str], log_dir: Path, name: str) -> Proc:
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as fh:
        popen = subprocess.Popen(args, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    return Proc(popen, log_path)


def _simulator(env: dict[str, str], log_dir: Path, latency_ms: float, parallel: int) -> tuple[str, Proc]:
    port = free_port()
    proc = _start([MEDQ, "llm", "simulate", "--port", str(port), "--latency-ms", f"{latency_ms:g}",
                   "--parallel", str(parallel)], env, log_dir, f"simulator-{port}")
    wait_http(f"http://127.0.0.1:{port}/v1/models", proc)
    return f"http://127.0.0.1:{port}/v1", proc


def _wait_batch(r: Any, batch: str, n: int, timeout_s: float) -> float:
    """Until every job is final; returns when (perf_counter). Reads the states only once
    the queue and kombu's unacked hash are empty, as ``medq bench`` does."""
    from medq.core.contract import QUEUE
    from medq.state.jobs import counts

    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if r.llen(QUEUE) + r.hlen("unacked") == 0:
            c = counts(r, batch)
            if c["succeeded"] + c["failed"] >= n:
                return time.perf_counter()
        time.sleep(0.05)
    raise TimeoutError(f"batch {batch} not done in {timeout_s:.0f}s")


def _records(path: Path, n: int, batch: str) -> Path:
    from medq.tools.samples import sample_path

    notes = [json.loads(x)["text"] for x in sample_path("clinical_note").read_text().splitlines() if x.strip()]
    path.write_text("".join(json.dumps({"id": f"{batch}-{i:06d}", "text": notes[i % len(notes)]}) + "\n"
                            for i in range(n)))
    return path


def bench_one(n_hosts: int, latency_ms: float, jobs: int, parallel: int = 64, redis_url: str = TEST_REDIS_URL,
              direct: bool = False) -> dict[str, Any]:
    """jobs/s of ``jobs`` jobs through ``n_hosts`` worker hosts (one ``medq worker`` each,
    threads pool, ``-c`` as ``medq bench`` picks it: 2 x parallel / 16 messages on each host)
    against a simulator of ``latency_ms`` and ``parallel``. ``direct``: one worker in the
    root namespace, no forwarder (what the harness itself costs)."""
    import redis

    log_dir = Path(tempfile.mkdtemp(prefix="medq-hosts-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDQ_")}
    env.update(MEDQ_REDIS_URL=redis_url, PYTHONUNBUFFERED="1", MEDQ_LLM__MODEL="medq-simulator")
    r = redis.Redis.from_url(redis_url)
    procs: list[Proc] = []
    hosts = Hosts(n_hosts)
    try:
        base, sim = _simulator(env, log_dir, latency_ms, max(parallel, 64))
        procs.append(sim)
        per = max(math.ceil(2 * parallel / 16), 2)
        wenv = {**env, "MEDQ_LLM__BASE_URL": base, "MEDQ_LLM__MAX_IN_FLIGHT": str(parallel), "MEDQ_LLM__MAX_WAIT_S": "30"}
        cmd = [MEDQ, "worker", "-c", str(per), "--", "--without-mingle", "--without-gossip"]
        if direct:
            procs.append(_start(cmd, wenv, log_dir, "worker-direct"))
        else:
            hosts.__enter__()
            wenv.update(MEDQ_REDIS_URL=hosts.reach(redis_url), MEDQ_LLM__BASE_URL=hosts.reach(base))
            procs += [_start(h.command(cmd), wenv, log_dir, f"worker-h{h.index}") for h in hosts]
        for p in procs[1:]:
            wait_log(p, " ready.", timeout_s=90)
        time.sleep(1.0)
        warm = f"hb-warm-{os.getpid()}-{time.monotonic_ns()}"
        res = subprocess.run([MEDQ, "enqueue", str(_records(log_dir / "warm.jsonl", 100, warm)), "--schema",
                              "clinical_note", "--batch", warm], env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        _wait_batch(r, warm, 100, 120)
        batch = f"hb-{n_hosts}-{os.getpid()}-{time.monotonic_ns()}"
        path = _records(log_dir / "recs.jsonl", jobs, batch)
        started = time.perf_counter()
        res = subprocess.run([MEDQ, "enqueue", str(path), "--schema", "clinical_note", "--batch", batch],
                             env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        done = _wait_batch(r, batch, jobs, 600)
        per_s = jobs / (done - started)
        ceiling = parallel / (latency_ms / 1000) if latency_ms else None
        for b in (warm, batch):
            subprocess.run([MEDQ, "purge", b, "--results", "--yes"], env=env, capture_output=True)
        return {"hosts": n_hosts, "direct": direct, "latency_ms": latency_ms, "jobs": jobs, "messages_per_host": per,
                "seconds": done - started, "jobs_per_s": per_s,
                "utilisation": per_s / ceiling if ceiling else None}
    finally:
        for p in reversed(procs):
            p.stop()
        hosts.close()
        r.close()


def bench(jobs: int = 2000, latencies_ms: tuple[float, ...] = (200.0, 0.0), parallel: int = 64) -> str:
    """jobs/s with 1, 2 and 3 hosts (and one worker without a namespace, the harness's
    cost) at each latency; a markdown table."""
    rows = ["| latency | hosts | messages/host | jobs | seconds | jobs/s | utilisation (jobs/s / (parallel/latency)) |",
            "|---|---|---|---|---|---|---|"]
    for latency in latencies_ms:
        for n, direct in ((1, True), (1, False), (2, False), (3, False)):
            res = bench_one(n, latency, jobs, parallel, direct=direct)
            util = f"{res['utilisation']:.3f}" if res["utilisation"] is not None else "-"
            label = "1 (root namespace, no forwarder)" if direct else str(n)
            rows.append(f"| {latency:g} ms | {label} | {res['messages_per_host']} | {jobs} | {res['seconds']:.1f} "
                        f"| {res['jobs_per_s']:.1f} | {util} |")
            print(rows[-1], file=sys.stderr, flush=True)
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.hosts")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="jobs/s with 1, 2, 3 worker hosts (MEDQ_TEST_REDIS_URL's Redis)")
    b.add_argument("--jobs", type=int, default=2000)
    b.add_argument("--latency-ms", type=float, action="append", help="repeat; default 200 and 0")
    b.add_argument("--parallel", type=int, default=64)
    sub.add_parser("clean", help="remove namespaces and links of runs that died")
    args = p.parse_args(argv)
    if args.cmd == "clean":
        print("\n".join(clean_stale()) or "nothing to clean")
        return 0
    why = netns_problem()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    print(bench(args.jobs, tuple(args.latency_ms or (200.0, 0.0)), args.parallel))
    return 0


if __name__ == "__main__":
    sys.exit(main())
