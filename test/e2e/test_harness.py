"""Tests of the harness itself: Envoy WITHOUT the plugin, and the mock provider."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from harness import (
    collect_keys,
    env_keys,
    envoy_config,
    find_leaks,
    free_port,
    log_records,
    parse_stats,
    plugin_log_text,
)


def test_free_port_is_bindable():
    p = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", p))


def test_envoy_without_filter_proxies_to_mock(envoy_factory, mock):
    envoy = envoy_factory.start(wasm=False)
    r = envoy.chat(headers={"authorization": "Bearer client-key-1"})
    assert r.status == 200, r
    reqs = mock.requests()
    assert len(reqs) == 1
    assert reqs[0]["method"] == "POST"
    assert reqs[0]["path"] == "/v1/chat/completions"
    assert mock.keys_received() == ["client-key-1"]
    # The admin stats see the request on the generated route's cluster.
    stats = envoy.stats()
    assert stats["cluster.mock_provider.upstream_rq_completed"] >= 1
    # envoy.url is the listener's (not admin's) address: a request to it reaches the mock.
    with urllib.request.urlopen(envoy.url + "/v1/models", timeout=10) as r:
        assert r.status == 200
    assert [q["path"] for q in sorted(mock.requests(), key=lambda q: q["seq"])] == [
        "/v1/chat/completions", "/v1/models"]


def test_mock_limit_gives_429_through_envoy(envoy_factory, mock):
    mock.set_keys({"keys": {"k-limited-1": {"limit": 2, "windowMs": 60000}}})
    envoy = envoy_factory.start(wasm=False)
    statuses = [envoy.chat(headers={"authorization": "Bearer k-limited-1"}).status for _ in range(4)]
    assert statuses == [200, 200, 429, 429]
    st = mock.stats()
    assert st["by_key"]["k-limited-1"]["received"] == 4
    mock.clear()
    assert mock.requests() == []


def test_parallel_keepalive_clients(envoy_factory, mock):
    envoy = envoy_factory.start(wasm=False, concurrency=2)
    results = envoy.parallel(lambda c, i: c.chat(headers={"x-api-key": f"pk-{i % 3}"}).status, n=30, concurrency=5)
    assert results == [200] * 30
    assert sorted(set(mock.keys_received())) == ["pk-0", "pk-1", "pk-2"]
    # 5 threads with keep-alive: far fewer downstream connections than requests.
    assert envoy.stats()["http.e2e.downstream_cx_total"] <= 10


def test_higress_style_cluster_name_and_custom_routes(envoy_factory, mock):
    envoy = envoy_factory.start(
        wasm=False,
        cluster_name="outbound|80||llm.mock.svc",
        routes=[("only-v1", "/v1/"), {"name": "blocked", "prefix": "/", "direct_response": {"status": 404}}],
    )
    assert envoy.chat().status == 200
    assert envoy.request("GET", "/other").status == 404
    assert len(mock.requests()) == 1
    assert envoy.stats()["cluster.outbound|80||llm.mock.svc.upstream_rq_completed"] == 1


def test_start_expect_failure_catches_broken_envoy_config(envoy_factory):
    # An unknown field in the route makes Envoy reject the bootstrap and exit non-zero.
    log = envoy_factory.start_expect_failure(
        None, wasm=False, routes=[{"name": "bad", "prefix": "/", "no_such_field": 1}], timeout=20)
    assert "no_such_field" in log


def test_start_raises_with_log_tail_when_envoy_dies(envoy_factory):
    with pytest.raises(AssertionError, match="exited early"):
        envoy_factory.start(wasm=False, routes=[{"name": "bad", "prefix": "/", "no_such_field": 1}])


def test_collect_keys_walks_everything():
    cfg = {
        "apiTokens": ["plain-1", {"token": "obj-2", "name": "second"}],
        "_rules_": [{"_match_route_": ["r"], "apiTokens": [{"token": "rule-3"}]}],
        "fallbacks": [{"provider": "x", "apiTokens": ["fb-4"]}, {"token": "fb-5", "name": "n5"}],
    }
    keys = [k for _, k in collect_keys(cfg)]
    assert keys == ["plain-1", "obj-2", "rule-3", "fb-4", "fb-5"]
    descs = [d for d, _ in collect_keys(cfg)]
    assert all(k not in " ".join(descs) for k in keys)  # descriptions never contain the key
    raw = '{"apiTokens": ["raw-1", {"token": "raw-2"}], oops'
    assert {k for _, k in collect_keys(raw)} == {"raw-1", "raw-2"}


def test_env_keys_are_split_like_the_plugin_splits_a_variable_and_scanned_for():
    env = {"ONE": "env-1", "LIST": " env-2,env-3\n\nenv-4\n", "UNSET": None}
    keys = env_keys(env)
    assert [k for _, k in keys] == ["env-1", "env-2", "env-3", "env-4"]
    assert all(k not in d for d, k in keys)  # descriptions name the variable, never the key
    assert find_leaks(keys, "pool p: key x ... env-3 ...", "log") == ["$LIST item 2 found in log"]


@pytest.mark.wasm_only("the wasm logger's records")
def test_plugin_log_text_keeps_only_wasm_records():
    log = (
        "[2025-01-01 00:00:00.000][12][debug][router] [source/common/router/router.cc:1] router decoding headers:\n"
        "'authorization', 'Bearer secret-in-router'\n"
        "[2025-01-01 00:00:00.001][12][info][wasm] [source/extensions/common/wasm/context.cc:1] wasm log ai-key-failover: picked demo-1\n"
        "second line of the same record\n"
    )
    recs = log_records(log)
    assert [r[0] for r in recs] == ["router", "wasm"]
    text = plugin_log_text(log)
    assert "secret-in-router" not in text and "second line" in text


@pytest.mark.wasm_only("the generated wasm filter config")
def test_generated_config_shape():
    cfg = envoy_config(upstream_port=1234, plugin_config={"apiTokens": ["a"]}, cluster_name="outbound|80||x")
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    vh = hcm["route_config"]["virtual_hosts"][0]
    assert vh["name"] == "default" and vh["domains"] == ["*"]
    assert [r["name"] for r in vh["routes"]] == ["route-chat", "route-embeddings", "route-default"]
    assert all(r["route"] == {"cluster": "outbound|80||x", "timeout": "30s"} for r in vh["routes"])
    wasm = hcm["http_filters"][0]["typed_config"]["config"]
    assert wasm["vm_config"]["vm_id"] == "ai-key-failover" and wasm["root_id"] == "ai-key-failover"
    assert wasm["configuration"]["value"] == '{"apiTokens": ["a"]}'
    assert hcm["http_filters"][-1]["name"] == "envoy.filters.http.router"
    assert parse_stats("a.b: 3\nc: P0(nan,1)\n") == {"a.b": 3, "c": "P0(nan,1)"}


def test_mock_script_always_and_stream(envoy_factory, mock):
    mock.set_keys({"keys": {"k-script-1": {}}})
    mock.script("k-script-1", [{"status": 503}, {"status": 429, "headers": {"retry-after": "1"}}])
    envoy = envoy_factory.start(wasm=False)
    h = {"authorization": "Bearer k-script-1"}
    r1, r2, r3 = (envoy.chat(headers=h) for _ in range(3))
    assert (r1.status, r2.status, r3.status) == (503, 429, 200)
    assert r2.headers["retry-after"] == "1"
    mock.always("k-script-1", {"status": 500, "body": {"error": {"message": "boom"}}})
    assert envoy.chat(headers=h).status == 500
    mock.always("k-script-1", None)
    r = envoy.chat(headers=h, stream=True)
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.sse_events()[-1] == "[DONE]"
    assert mock.stats()["by_key"]["k-script-1"]["received"] == 5
