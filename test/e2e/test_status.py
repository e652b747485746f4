"""`scripts/status.py` and `make status` against a real Envoy: the pools and keys it shows, that it
shows no key, and what it says when there is no gateway or no plugin."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

from harness import REPO, STATS_PREFIX, free_port, wait_for

A, B, C = "sk-test-alpha-0001", "sk-test-bravo-0002", "sk-test-charlie-0003"
D = "sk-test-delta-0004"
KEYS = (A, B, C, D)
STATUS = REPO / "scripts/status.py"
PREFIX = f"{STATS_PREFIX}ai_key_failover.pool."
HASH = re.compile(r"key-[0-9a-f]{8}")

CONFIG = {
    "name": "main",
    "apiTokens": [{"token": A, "name": "alpha"}, {"token": B, "name": "bravo"}, C],
    "failover": {"cooldownDuration": 60000},
    "_rules_": [{"_match_route_": ["route-embeddings"], "name": "emb", "apiTokens": [D]}],
}


def run_status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(STATUS), *args], capture_output=True, text=True, timeout=30)


def run_make_status(admin: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "status", f"ADMIN_URL={admin}"], cwd=REPO, capture_output=True, text=True,
                          timeout=30)


def assert_no_key(text: str) -> None:
    for k in KEYS:
        assert k not in text, "status output shows a configured key"
    assert "sk-test" not in text


def key_rows(text: str) -> dict[str, dict[str, list[str]]]:
    """{pool: {key: [state, failures, cooldown, marked_down, restored]}} from the text table."""
    pools: dict[str, dict[str, list[str]]] = {}
    pool = None
    for line in text.splitlines():
        if m := re.match(r"pool (\S+): \d+/\d+ keys available$", line):
            pool = m[1]
            pools[pool] = {}
        elif pool and line.startswith("  ") and not line.lstrip().startswith("KEY "):
            cols = line.split()
            if len(cols) == 6 and cols[1] in ("available", "DOWN", "DISABLED", "unknown"):
                pools[pool][cols[0]] = cols[1:]
    return pools


def down_gateway(envoy_factory, mock):
    """Gateway with pool main (alpha always 429, bravo, an unnamed key) and pool emb (one unnamed
    key); alpha has been marked down once, and the plugin's gauges have caught up."""
    mock.set_keys({"keys": {A: {"always": {"status": 429}}, B: {}, C: {}, D: {}}})
    envoy = envoy_factory.start(CONFIG)
    with envoy.client() as c:
        statuses = [c.chat().status for _ in range(6)]
        assert c.chat(path="/v1/embeddings").status == 200
    assert statuses.count(429) == 1
    envoy.wait_log(r"key alpha marked down after status 429", plugin_only=True)

    def synced():  # gauges and request counters are published once per second
        s = envoy.stats(PREFIX)
        return (s.get(PREFIX + "main.key.alpha.key_down_until_seconds", 0) > 0
                and s.get(PREFIX + "main.requests_keyed") == 6 and s.get(PREFIX + "emb.requests_keyed") == 1
                and s.get(PREFIX + "main.keys_available") == 2)

    wait_for(synced, 5, interval=0.2, what="plugin gauges to sync")
    return envoy


def test_status_shows_pools_and_keys_without_keys(envoy_factory, mock):
    envoy = down_gateway(envoy_factory, mock)

    r = run_status("--admin", envoy.admin_url)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    print(out)
    assert_no_key(out + r.stderr)
    assert "pool main: 2/3 keys available" in out
    assert "pool emb: 1/1 keys available" in out
    assert "requests keyed 6, rejected 0; keys restored 0" in out
    assert "keys marked down: rate_limit 1, server_error 0, key_refused 0, other 0, budget_spent 0 (total 1)" in out

    rows = key_rows(out)
    main = rows["main"]
    state, failures, cooldown, marked, restored = main["alpha"]
    assert (state, failures, marked, restored) == ("DOWN", "1", "1", "0")
    assert 50 <= int(cooldown) <= 66  # 60 s plus up to 10% jitter
    assert main["bravo"] == ["available", "0", "-", "0", "0"]
    unnamed = [k for k in main if k not in ("alpha", "bravo")]
    assert len(unnamed) == 1 and HASH.fullmatch(unnamed[0]), main
    assert main[unnamed[0]] == ["available", "0", "-", "0", "0"]
    assert len(rows["emb"]) == 1 and HASH.fullmatch(next(iter(rows["emb"])))

    j = run_status("--admin", envoy.admin_url, "--json")
    assert j.returncode == 0, j.stderr
    assert_no_key(j.stdout + j.stderr)
    doc = json.loads(j.stdout)
    pools = {p["name"]: p for p in doc["pools"]}
    assert set(pools) == {"main", "emb"}
    p = pools["main"]
    assert (p["keys_configured"], p["keys_available"], p["requests_keyed"], p["requests_rejected"]) == (3, 2, 6, 0)
    assert p["keys_marked_down"] == {"rate_limit": 1, "server_error": 0, "key_refused": 0, "other": 0, "budget_spent": 0}
    assert p["keys_restored"] == 0
    keys = {k["name"]: k for k in p["keys"]}
    alpha = keys.pop("alpha")
    assert alpha["state"] == "DOWN" and alpha["consecutive_failures"] == 1
    assert alpha["marked_down"] == 1 and alpha["restored"] == 0
    assert 50 <= alpha["cooldown_left_seconds"] <= 66
    assert alpha["down_until_unix"] >= doc["time"] + alpha["cooldown_left_seconds"]
    assert all(k["state"] == "available" and k["cooldown_left_seconds"] is None for k in keys.values())
    assert "bravo" in keys and any(HASH.fullmatch(n) for n in keys)

    # --watch --json: one JSON document per line until Ctrl-C, which exits 0.
    w = subprocess.Popen([sys.executable, str(STATUS), "--admin", envoy.admin_url, "--json", "--watch", "0.3"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Interrupt only once it has printed twice: on a loaded machine start-up alone can take a second.
        first = [w.stdout.readline(), w.stdout.readline()]
        assert w.poll() is None, "--watch keeps running"
        w.send_signal(signal.SIGINT)
        out, err = w.communicate(timeout=10)
        out = "".join(first) + out
    finally:
        if w.poll() is None:
            w.kill()
            w.communicate()
    assert w.returncode == 0, err
    docs = [json.loads(line) for line in out.splitlines() if line.endswith("}")]
    assert len(docs) >= 2 and all({p["name"] for p in d["pools"]} == {"main", "emb"} for d in docs)
    assert_no_key(out + err)


def test_status_shows_a_key_refused_until_reload_as_disabled(envoy_factory, mock):
    mock.set_keys({"keys": {A: {"always": {"status": 401}}, B: {}, C: {"always": {"status": 429}}}})
    envoy = envoy_factory.start({"name": "main", "failover": {"disableDuration": 0, "cooldownDuration": 60000},
                                 "apiTokens": [{"token": A, "name": "alpha"}, {"token": B, "name": "bravo"},
                                               {"token": C, "name": "charlie"}]})
    with envoy.client() as c:
        statuses = [c.chat().status for _ in range(6)]
    assert sorted(statuses) == [200, 200, 200, 200, 401, 429]

    def synced():
        s = envoy.stats(PREFIX)
        return (s.get(PREFIX + "main.key.alpha.key_disabled") == 1
                and s.get(PREFIX + "main.key.charlie.key_down_until_seconds", 0) > 0)

    wait_for(synced, 5, interval=0.2, what="plugin gauges to sync")
    r = run_status("--admin", envoy.admin_url)
    assert r.returncode == 0, r.stderr
    assert_no_key(r.stdout + r.stderr)
    main = key_rows(r.stdout)["main"]
    assert main["alpha"][0] == "DISABLED" and main["alpha"][2] == "-", main["alpha"]
    assert main["charlie"][0] == "DOWN" and 50 <= int(main["charlie"][2]) <= 66, main["charlie"]
    assert main["bravo"][0] == "available"

    doc = json.loads(run_status("--admin", envoy.admin_url, "--json").stdout)
    alpha = next(k for p in doc["pools"] for k in p["keys"] if k["name"] == "alpha")
    assert alpha["state"] == "DISABLED" and alpha["cooldown_left_seconds"] is None
    assert alpha["down_until_unix"] is None


def test_make_status_prints_the_same_table(envoy_factory, mock):
    envoy = down_gateway(envoy_factory, mock)
    direct = run_status("--admin", envoy.admin_url)
    made = run_make_status(envoy.admin_url)
    assert made.returncode == 0, made.stderr
    assert_no_key(made.stdout + made.stderr)
    assert made.stdout.startswith(f"ai-key-failover status from {envoy.admin_url} at ")

    def comparable(text):  # without the time stamp line; the cooldown may tick down between the runs
        return [re.sub(r"^(\s+\S+\s+DOWN\s+\d+\s+)\d+", r"\1<left>", line) for line in text.splitlines()[1:]]

    assert comparable(made.stdout) == comparable(direct.stdout)
    assert key_rows(made.stdout)["main"]["alpha"][0] == "DOWN"


def test_no_gateway_says_not_running(tmp_path):
    admin = f"http://127.0.0.1:{free_port()}"
    r = run_status("--admin", admin)
    assert r.returncode == 1
    assert r.stdout == ""
    assert f"gateway not running: cannot reach Envoy admin at {admin} (connection refused)" in r.stderr
    assert "make run" in r.stderr

    j = run_status("--admin", admin, "--json")
    assert j.returncode == 1 and "gateway not running" in j.stderr

    made = run_make_status(admin)
    assert made.returncode != 0
    assert "gateway not running" in made.stderr


def test_envoy_without_the_plugin_says_it_is_not_loaded(envoy_factory, mock):
    envoy = envoy_factory.start(None, wasm=False)
    r = run_status("--admin", envoy.admin_url)
    assert r.returncode == 1
    assert r.stdout == ""
    assert "running, but the ai-key-failover plugin is not loaded there" in r.stderr
