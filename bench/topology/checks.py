"""What the rehearsal checks on the running topology: exposure, request limits, scrapes, alerts.

- `internal_exposure`: every internal port refuses connections on the public address (where
  only nginx listens) and on the machine's own non-loopback address, and answers internally;
- `oversized_body`: nginx answers 413 to a body above client_max_body_size;
- `flood`: one client far above nginx's per-client rate gets 429 while another client is served;
- `targets` / `query`: Prometheus' HTTP API (/api/v1/targets, /api/v1/query);
- `alert_rule_tests`: `promtool check rules` and `promtool test rules` on the shipped rules.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import subprocess
import urllib.parse
import urllib.request

import httpx

from bench.topology.proc import INTERNAL_HOST, TopologyError, poll
from bench.topology.services import ALERT_RULES, ALERT_TESTS, which


def machine_address() -> str | None:
    """This machine's own non-loopback IPv4 address (the route out), or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: UDP connect only picks the route
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


def _connect(host: str, port: int) -> str:
    try:
        with socket.create_connection((host, port), timeout=2):
            return "open"
    except ConnectionRefusedError:
        return "refused"
    except OSError as exc:
        return f"error: {exc.__class__.__name__}"


def internal_exposure(ports: dict[str, int], outside: list[str]) -> dict:
    """For each internal service: refused from every outside address, open on the internal one."""
    detail = {}
    for name, port in sorted(ports.items()):
        seen = {host: _connect(host, port) for host in outside}
        seen[INTERNAL_HOST] = _connect(INTERNAL_HOST, port)
        detail[name] = seen
    exposed = sorted(n for n, seen in detail.items() if any(seen[h] != "refused" for h in outside))
    unreachable = sorted(n for n, seen in detail.items() if seen[INTERNAL_HOST] != "open")
    return {"outside_addresses": outside, "internal_ports": len(ports), "exposed": exposed,
            "internal_unreachable": unreachable, "ok": not exposed and not unreachable}


def oversized_body(host: str, port: int, size: int = 64 * 1024) -> int:
    """The status nginx answers to a POST /search whose body exceeds client_max_body_size."""
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("POST", "/search", body=b"x" * size, headers={"Content-Type": "application/octet-stream"})
        return conn.getresponse().status
    except (ConnectionResetError, BrokenPipeError):
        # nginx may close before reading the whole body; the status line is what counts.
        return -1
    finally:
        conn.close()


async def _flood(url: str, flooder: str, other: str, n: int) -> dict:
    statuses: dict[int, int] = {}
    limited = asyncio.Event()
    limits = httpx.Limits(max_connections=30)
    async with httpx.AsyncClient(base_url=url, timeout=15, limits=limits,
                                 transport=httpx.AsyncHTTPTransport(local_address=flooder)) as bad, \
            httpx.AsyncClient(base_url=url, timeout=15,
                              transport=httpx.AsyncHTTPTransport(local_address=other)) as good:

        async def hit() -> None:
            try:
                resp = await bad.get("/")
            except httpx.HTTPError:
                statuses[-1] = statuses.get(-1, 0) + 1
                return
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
            if resp.status_code == 429:
                limited.set()

        flood = asyncio.gather(*(hit() for _ in range(n)))
        try:
            await asyncio.wait_for(limited.wait(), timeout=20)
            during = (await good.get("/")).status_code
        except TimeoutError:
            during = None
        await flood
    return {"flood_statuses": {str(k): v for k, v in sorted(statuses.items())}, "other_client_status": during,
            "ok": statuses.get(429, 0) > 0 and during == 200}


def flood(url: str, flooder: str = "127.0.2.1", other: str = "127.0.2.2", n: int = 150) -> dict:
    """`n` requests at once from one client address, and one from another address meanwhile."""
    return asyncio.run(_flood(url, flooder, other, n))


# -- Prometheus --------------------------------------------------------------------------------


def _api(prom_url: str, path: str, params: dict | None = None) -> dict:
    url = f"{prom_url}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=15) as resp:
        out = json.loads(resp.read())
    if out.get("status") != "success":
        raise RuntimeError(f"Prometheus {path}: {out}")
    return out["data"]


def targets(prom_url: str) -> list[dict]:
    return [{"job": t["labels"]["job"], "instance": t["labels"]["instance"], "health": t["health"],
             "error": t.get("lastError", "")} for t in _api(prom_url, "/api/v1/targets")["activeTargets"]]


def wait_targets_up(prom_url: str, timeout_s: float, alive=()) -> tuple[list[dict], list[dict]]:
    """(all targets, those not up) once every target was scraped up, or when `timeout_s` ran out."""
    last: list[dict] = []

    def all_up():
        last[:] = targets(prom_url)
        return bool(last) and all(t["health"] == "up" for t in last)

    try:
        poll(all_up, timeout_s, "every scrape target up", alive)
    except TopologyError:
        # Reported as the targets still down (the last answer), not raised.
        return last, [t for t in last if t["health"] != "up"]
    return last, [t for t in last if t["health"] != "up"]


def query(prom_url: str, expr: str) -> list:
    return _api(prom_url, "/api/v1/query", {"query": expr})["result"]


def rules_loaded(prom_url: str) -> int:
    return sum(len(g["rules"]) for g in _api(prom_url, "/api/v1/rules")["groups"])


def alert_rule_tests() -> dict:
    promtool = which("promtool")
    check = subprocess.run([promtool, "check", "rules", str(ALERT_RULES)], capture_output=True, text=True,
                           timeout=60, check=False)
    test = subprocess.run([promtool, "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True,
                          timeout=120, cwd=ALERT_TESTS.parent, check=False)
    return {"check_rc": check.returncode, "test_rc": test.returncode,
            "output": (test.stdout + test.stderr)[-600:] if test.returncode else "",
            "passed": check.returncode == 0 and test.returncode == 0}
