#!/usr/bin/env python3
"""Status of the ai-key-failover pools of a running gateway, read from Envoy's admin /stats.

    scripts/status.py [--admin URL] [--json] [--watch N]

Prints each pool (keys available/configured, requests keyed and rejected, keys marked down by
failure class, keys restored) and one row per key: its name or short hash, available, DOWN or
DISABLED (refused by the provider), consecutive failures, seconds of cooldown left, marked-down and
restored counts.

It reads only GET <admin>/stats?filter=^(wasmcustom|dynamicmodulescustom)\\.ai_key_failover\\.
(the wasm filter's and the native module's stats: Envoy prefixes them differently) and prints only what
those stat names and values say; the plugin never puts a key in a stat name, so neither does
this. Python 3 standard library only.

Exit codes: 0 the status was printed; 1 the gateway is not running (the admin endpoint cannot be
reached), it is not an Envoy admin endpoint, or the plugin is not loaded there; 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

DEFAULT_ADMIN = "http://127.0.0.1:9901"
# Envoy puts `wasmcustom.` before a wasm filter's stats and `dynamicmodulescustom.` before a
# dynamic module's; the names below the prefix are the same for both hosts.
PREFIX = "ai_key_failover."
HOST_PREFIXES = ("wasmcustom.", "dynamicmodulescustom.")
# A dynamic module run as an upstream filter has its stats in the cluster's scope, under
# `cluster.<name>.`: those count too.
STATS_FILTER = r"^(cluster\.[^.]+\.)?(wasmcustom|dynamicmodulescustom)\.ai_key_failover\."
_CLUSTER_SCOPE = re.compile(r"^cluster\.[^.]+\.")
CLASSES = ("rate_limit", "server_error", "key_refused", "other", "budget_spent")
TIMEOUT_S = 3.0

# Pool and key labels are configured names ([A-Za-z0-9_-]{1,64}) or short hashes; a stat whose
# name does not fit these shapes is not one of the plugin's and is ignored.
_L = r"[A-Za-z0-9_-]+"
_KEY_STAT = re.compile(rf"pool\.({_L})\.key\.({_L})\.key_(available|consecutive_failures|down_until_seconds|disabled|marked_down|restored)")
_CLASS_STAT = re.compile(rf"pool\.({_L})\.class\.({_L})\.keys_marked_down")
_POOL_STAT = re.compile(rf"pool\.({_L})\.(keys_configured|keys_available|requests_keyed|requests_rejected|keys_restored|cas_gave_up)")


class StatusError(Exception):
    """Something that stops the status from being shown; the message is for the user."""


def normalize_admin(url: str) -> str:
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


def _reason(err: BaseException) -> str:
    """A short human reason for a failed connection."""
    if isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError):
        err = err.reason if isinstance(err.reason, BaseException) else err
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, (socket.timeout, TimeoutError)):
        return f"no answer within {TIMEOUT_S:g}s"
    if isinstance(err, socket.gaierror):
        return "unknown host"
    if isinstance(err, ConnectionResetError):
        return "connection reset"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower()
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)
    return str(err) or type(err).__name__


def fetch_stats(admin: str) -> tuple[str, bool]:
    """The plain-text admin /stats, filtered to the plugin's stats, and whether Envoy answered."""
    url = f"{admin}/stats?filter={urllib.parse.quote(STATS_FILTER, safe='')}"
    # The admin endpoint is local: never go through an http_proxy from the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=TIMEOUT_S) as resp:
            is_envoy = (resp.headers.get("server") or "").lower() == "envoy"
            return resp.read().decode("utf-8", errors="replace"), is_envoy
    except urllib.error.HTTPError as e:
        raise StatusError(f"{admin} answered HTTP {e.code} to GET /stats: is it Envoy's admin endpoint?") from None
    except (urllib.error.URLError, OSError) as e:
        raise StatusError(f"gateway not running: cannot reach Envoy admin at {admin} ({_reason(e)}); "
                          "start it with 'make run'") from None
    except ValueError as e:  # a URL urllib cannot use
        raise StatusError(f"bad admin URL {admin!r}: {e}") from None


def parse(text: str) -> dict[str, dict[str, Any]]:
    """`name: value` lines -> {pool: {"stats": {...}, "classes": {...}, "keys": {key: {...}}}}."""
    pools: dict[str, dict[str, Any]] = {}

    def pool(name: str) -> dict[str, Any]:
        return pools.setdefault(name, {"stats": {}, "classes": {}, "keys": {}})

    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        name = _CLUSTER_SCOPE.sub("", name, count=1) if not name.startswith(HOST_PREFIXES) else name
        host_prefix = next((p for p in HOST_PREFIXES if name.startswith(p + PREFIX)), None)
        if not sep or host_prefix is None:
            continue
        try:
            v = int(value.strip())
        except ValueError:
            continue  # histograms and the like: the plugin defines none
        rest = name[len(host_prefix) + len(PREFIX):]
        if m := _KEY_STAT.fullmatch(rest):
            pool(m[1])["keys"].setdefault(m[2], {})[m[3]] = v
        elif m := _CLASS_STAT.fullmatch(rest):
            pool(m[1])["classes"][m[2]] = v
        elif m := _POOL_STAT.fullmatch(rest):
            pool(m[1])["stats"][m[2]] = v
    return pools


def build_status(pools: dict[str, dict[str, Any]], now: float) -> list[dict[str, Any]]:
    out = []
    for pname in sorted(pools):
        p = pools[pname]
        s = p["stats"]
        keys = []
        for kname in sorted(p["keys"]):
            k = p["keys"][kname]
            available = k.get("available", 0) == 1
            down_until = k.get("down_until_seconds", 0)
            if available:
                state, left = "available", None
            elif k.get("disabled", 0) == 1:
                # Refused by the provider; no end time (0) when disabled until a health check
                # passes or the configuration is loaded again (disableDuration 0).
                state, left = "DISABLED", max(0, int(down_until - now)) if down_until else None
            elif down_until == 0:
                # A down key always has a cooldown end; all zeros means the plugin has not
                # published this key's gauges yet (they are refreshed once per second).
                state, left = "unknown", None
            else:
                state, left = "DOWN", max(0, int(down_until - now))
            keys.append({
                "name": kname,
                "state": state,
                "consecutive_failures": k.get("consecutive_failures", 0),
                "cooldown_left_seconds": left,
                "down_until_unix": down_until or None,
                "marked_down": k.get("marked_down", 0),
                "restored": k.get("restored", 0),
            })
        classes = {c: p["classes"].get(c, 0) for c in CLASSES}
        classes.update({c: v for c, v in sorted(p["classes"].items()) if c not in classes})
        out.append({
            "name": pname,
            "keys_configured": s.get("keys_configured", len(keys)),
            "keys_available": s.get("keys_available", 0),
            "requests_keyed": s.get("requests_keyed", 0),
            "requests_rejected": s.get("requests_rejected", 0),
            "keys_marked_down": classes,
            "keys_restored": s.get("keys_restored", 0),
            "cas_gave_up": s.get("cas_gave_up", 0),
            "keys": keys,
        })
    return out


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def render_text(admin: str, status: list[dict[str, Any]], now: float) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    lines = [f"ai-key-failover status from {admin} at {stamp}"]
    for p in status:
        md = p["keys_marked_down"]
        lines += [
            "",
            f"pool {p['name']}: {p['keys_available']}/{p['keys_configured']} keys available",
            f"  requests keyed {p['requests_keyed']}, rejected {p['requests_rejected']}; "
            f"keys restored {p['keys_restored']}",
            "  keys marked down: " + ", ".join(f"{c} {n}" for c, n in md.items()) + f" (total {sum(md.values())})",
        ]
        if p["cas_gave_up"]:
            lines.append(f"  shared-state writes given up after retries: {p['cas_gave_up']}")
        rows = [["KEY", "STATE", "FAILURES", "COOLDOWN_LEFT_S", "MARKED_DOWN", "RESTORED"]]
        for k in p["keys"]:
            left = "-" if k["cooldown_left_seconds"] is None else str(k["cooldown_left_seconds"])
            rows.append([k["name"], k["state"], str(k["consecutive_failures"]), left,
                         str(k["marked_down"]), str(k["restored"])])
        lines += ["  " + line for line in _table(rows, right={2, 3, 4, 5})]
        if any(k["state"] == "unknown" for k in p["keys"]):
            lines.append("  (unknown: the plugin has not published this key's gauges yet; retry in a second)")
    return "\n".join(lines)


def snapshot(admin: str) -> tuple[list[dict[str, Any]], float]:
    text, is_envoy = fetch_stats(admin)
    now = time.time()
    pools = parse(text)
    if not pools and not is_envoy:
        raise StatusError(f"{admin} answered, but not as Envoy's admin endpoint, and it has no {PREFIX}* stats")
    if not pools:
        raise StatusError(f"Envoy at {admin} is running, but the ai-key-failover plugin is not loaded there "
                          f"(it has no {PREFIX}* stats)")
    return build_status(pools, now), now


def show(admin: str, as_json: bool, clear: bool = False, compact: bool = False) -> None:
    status, now = snapshot(admin)
    if as_json:
        out = json.dumps({"admin": admin, "time": int(now), "pools": status}, indent=None if compact else 2)
    else:
        out = render_text(admin, status, now)
    if clear:
        sys.stdout.write("\033[H\033[2J")
    print(out, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Status of the ai-key-failover key pools of a running Envoy, from its admin /stats.",
        epilog="Exit codes: 0 ok; 1 gateway not running, not Envoy, or plugin not loaded; 2 bad arguments.")
    ap.add_argument("--admin", default=os.environ.get("ADMIN_URL") or DEFAULT_ADMIN,
                    help=f"Envoy admin URL (default: $ADMIN_URL, else {DEFAULT_ADMIN})")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    ap.add_argument("--watch", type=float, metavar="N", help="refresh every N seconds until Ctrl-C")
    args = ap.parse_args(argv)
    if args.watch is not None and args.watch <= 0:
        ap.error("--watch needs a positive number of seconds")
    admin = normalize_admin(args.admin)

    if args.watch is None:
        try:
            show(admin, args.json)
        except StatusError as e:
            print(e, file=sys.stderr)
            return 1
        return 0

    # Watch: one JSON document per line with --json; otherwise redraw the screen on a terminal.
    # A gateway that goes away is reported and polled again, not fatal.
    redraw = sys.stdout.isatty() and not args.json
    try:
        while True:
            try:
                show(admin, args.json, clear=redraw, compact=args.json)
            except StatusError as e:
                if redraw:
                    sys.stdout.write("\033[H\033[2J")
                print(e, file=sys.stderr, flush=True)
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
