"""Keys from the environment: `{"fromEnv": "VAR"}` entries read Envoy's own environment variables
at configuration load: the wasm VM sees those `vm_config.environment_variables.host_env_keys`
passes in; the native module runs in Envoy's process and reads them there.

The factory's secret scan knows the values passed through `env=` (harness.env_keys), so a leak of
an environment key into the plugin's log or /stats fails every test here as it would for a key
written in the configuration."""

from __future__ import annotations

from collections import Counter

import pytest

from checks import wait_pool_stats
from harness import HOST

ALPHA = "sk-test-env-alpha-7f3c91"
TRIO = ["sk-test-env-trio-1-a8d2", "sk-test-env-trio-2-c41e", "sk-test-env-trio-3-95b7"]
FROM_CONFIG = "sk-test-env-inline-2d6f"


def host_env(*names: str) -> dict | None:
    """The wasm filter option that passes these variables of Envoy's process into the VM; the
    native module needs none (it is in Envoy's process)."""
    if HOST == "native":
        return None
    return {"vm_config": {"environment_variables": {"host_env_keys": list(names)}}}


# What the error for a missing or empty variable tells the operator to do, per host.
HOW_TO_SET = {"wasm": "host_env_keys", "native": "in the environment Envoy is started with"}[HOST]


def test_keys_from_the_environment_are_used_and_shown_nowhere(envoy_factory, mock):
    config = {"name": "envpool", "apiTokens": [
        {"fromEnv": "AKF_E2E_ALPHA", "name": "alpha"},
        {"fromEnv": "AKF_E2E_TRIO", "name": "trio"},
        {"token": FROM_CONFIG, "name": "inline"},
    ]}
    # Trailing newline and spaces, as a Secret mounted from a file often has.
    env = {"AKF_E2E_ALPHA": ALPHA, "AKF_E2E_TRIO": f" {TRIO[0]},{TRIO[1]}\n{TRIO[2]}\n"}
    envoy = envoy_factory.start(config, extra_filter_options=host_env(*env), env=env, concurrency=2)

    statuses = [envoy.chat(headers={"authorization": "Bearer sk-client-own"}).status for _ in range(10)]
    assert statuses == [200] * 10
    received = Counter(mock.keys_received())
    assert set(received) == {ALPHA, *TRIO, FROM_CONFIG}, received

    dump = envoy.admin("/config_dump").text
    assert "AKF_E2E_TRIO" in dump, "the config dump shows the variable's name, not its value"
    assert FROM_CONFIG in dump, "sanity: a key written in the configuration does show there"
    for key in [ALPHA, *TRIO]:
        assert key not in dump, "a key from the environment is in /config_dump"
    plugin_log = envoy.plugin_log()
    assert "configured pools envpool (5 keys)" in plugin_log, plugin_log[-2000:]
    for key in [ALPHA, *TRIO]:
        assert key not in plugin_log, "a key from the environment is in the plugin's debug log"


def test_a_variable_holding_three_keys_gives_a_pool_of_three(envoy_factory, mock):
    env = {"AKF_E2E_KEYS": ",".join(TRIO)}
    envoy = envoy_factory.start({"name": "trio", "apiTokens": [{"fromEnv": "AKF_E2E_KEYS", "name": "t"}]},
                                extra_filter_options=host_env("AKF_E2E_KEYS"), env=env)
    for _ in range(6):
        assert envoy.chat().status == 200
    # Round robin over exactly the three keys of the variable, each twice.
    assert Counter(mock.keys_received()) == Counter({k: 2 for k in TRIO})
    stats = wait_pool_stats(envoy, "trio", lambda s: s.get("keys_configured") == 3, what="keys_configured 3")
    assert {k for k in stats if k.startswith("key.")} >= {f"key.t-{n}.key_available" for n in (1, 2, 3)}


def test_a_missing_variable_makes_envoy_refuse_the_configuration_naming_it(envoy_factory, mock):
    log = envoy_factory.start_expect_failure(
        {"apiTokens": [{"fromEnv": "AKF_E2E_NOT_SET"}]},
        extra_filter_options=host_env("AKF_E2E_NOT_SET"), env={"AKF_E2E_NOT_SET": None})
    lines = [line for line in log.splitlines() if "invalid configuration" in line]
    assert lines, log[-3000:]
    assert "apiTokens[0].fromEnv: environment variable AKF_E2E_NOT_SET is not set" in lines[0], lines[0]
    assert HOW_TO_SET in lines[0], lines[0]
    if HOST == "native":
        assert "host_env_keys" not in lines[0], "the native module has no host_env_keys to set"
    assert mock.requests() == []


@pytest.mark.wasm_only("the native module runs in Envoy's process: Envoy's environment is its own")
def test_a_variable_envoy_has_but_does_not_pass_to_the_vm_is_refused(envoy_factory, mock):
    """The value reaches the plugin only through host_env_keys: Envoy's own environment is not
    the VM's."""
    env = {"AKF_E2E_UNLISTED": ALPHA}
    log = envoy_factory.start_expect_failure({"apiTokens": [{"fromEnv": "AKF_E2E_UNLISTED"}]}, env=env)
    assert "environment variable AKF_E2E_UNLISTED is not set" in log, log[-3000:]
    assert ALPHA not in log


def test_an_invalid_key_in_a_variable_is_refused_by_position_not_by_value(envoy_factory, mock):
    env = {"AKF_E2E_BAD": f"{TRIO[0]},{TRIO[1]} {TRIO[2]}"}
    log = envoy_factory.start_expect_failure({"apiTokens": [{"fromEnv": "AKF_E2E_BAD"}]},
                                             extra_filter_options=host_env("AKF_E2E_BAD"), env=env)
    lines = [line for line in log.splitlines() if "invalid configuration" in line]
    assert lines, log[-3000:]
    assert "apiTokens[0] (key 2 of $AKF_E2E_BAD): the key contains whitespace" in lines[0], lines[0]
    for key in TRIO:
        assert key not in log
