#!/usr/bin/env python3
"""The scripted part of `make run`: twenty chat completions through the gateway, then how many
429s the gateway absorbed, from the mock's own count, Envoy's retry stats and the plugin's.

Stdlib only. Called by scripts/run.sh once the mock and Envoy are up; exits 0 only when every
request was answered 200. Never prints a key: the mock's per-key stats are summed, and keys
appear by the names the plugin gives them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request

CHAT = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode(errors="replace")


def chat(gateway: str) -> int:
    req = urllib.request.Request(f"{gateway}/v1/chat/completions", data=CHAT, method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def envoy_stats(admin: str, cluster: str, pool: str) -> dict[str, int]:
    """Envoy's retry counters of the provider cluster and the plugin's counters of the pool."""
    wanted = {
        "envoy_retries": f"cluster.{cluster}.upstream_rq_retry",
        "envoy_retries_ok": f"cluster.{cluster}.upstream_rq_retry_success",
        "envoy_retry_overflow": f"cluster.{cluster}.upstream_rq_retry_overflow",
        "plugin_retries": f"wasmcustom.ai_key_failover.pool.{pool}.retries",
        "plugin_retries_ok": f"wasmcustom.ai_key_failover.pool.{pool}.retries_succeeded",
        "plugin_marked_down": f"wasmcustom.ai_key_failover.pool.{pool}.class.rate_limit.keys_marked_down",
    }
    by_name = {}
    for line in get(f"{admin}/stats").splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            by_name[name] = int(value)
    return {k: by_name.get(v, 0) for k, v in wanted.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gateway", required=True)
    ap.add_argument("--admin", required=True)
    ap.add_argument("--mock", required=True)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--cluster", default="mock_provider")
    ap.add_argument("--pool", default="demo")
    args = ap.parse_args()

    print(f"  {args.requests} chat completions through the gateway, one after another:")
    statuses = [chat(args.gateway) for _ in range(args.requests)]
    print("    " + " ".join(str(s) for s in statuses))

    mock = json.loads(get(f"{args.mock}/_mock/stats"))
    upstream_429 = sum(k.get("status", {}).get("429", 0) for k in mock.get("by_key", {}).values())
    # The plugin flushes its counters once a second; Envoy's are immediate. Wait (bounded) until
    # the plugin has counted every retry Envoy made, so the two agree when printed.
    deadline = time.monotonic() + 5
    stats = envoy_stats(args.admin, args.cluster, args.pool)
    while stats["plugin_retries"] < stats["envoy_retries"] and time.monotonic() < deadline:
        time.sleep(0.2)
        stats = envoy_stats(args.admin, args.cluster, args.pool)

    ok = statuses.count(200)
    print(f"\n  {ok}/{len(statuses)} answered 200. Behind the gateway the provider answered 429 {upstream_429} "
          f"times, out of {mock.get('total', 0)} requests; the gateway absorbed {'every one' if ok == len(statuses) else 'some'}:")
    overflow = f", {stats['envoy_retry_overflow']} not retried (overflow)" if stats["envoy_retry_overflow"] else ""
    print(f"    Envoy:  {stats['envoy_retries']} retries with another key, {stats['envoy_retries_ok']} succeeded{overflow} "
          f"(cluster.{args.cluster}.upstream_rq_retry, upstream_rq_retry_success)")
    print(f"    plugin: {stats['plugin_marked_down']} keys taken out for their rate limits, {stats['plugin_retries']} "
          f"retries, {stats['plugin_retries_ok']} succeeded "
          f"(pool.{args.pool}: class.rate_limit.keys_marked_down, retries, retries_succeeded)")
    return 0 if ok == len(statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
