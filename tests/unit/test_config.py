"""Configuration loading: TOML file, environment, --set, precedence and errors that name
the offending key; plus the CLI's use of it."""

from __future__ import annotations

from pathlib import Path

import pytest
from gateway import cli
from gateway.config import Config, ConfigError, load_config

TOML = """
node_id = "n7"

[server]
port = 9001
subprotocols = ["gateway.v1", "chat"]

[limits]
queue_bytes = 524288

[auth]
mode = "jwt"
secret = "file-secret-file-secret-file-secret-1234"

[hooks]
timeout = 1

[[routes]]
pattern = "live:{room_id}"
merge_ms = 50
user_rate = 2.5

[[routes]]
pattern = "*"
"""


@pytest.fixture
def toml_file(tmp_path: Path) -> Path:
    p = tmp_path / "gateway.toml"
    p.write_text(TOML)
    return p


DEV = ["auth.mode=dev", "server.host=127.0.0.1"]


def test_defaults() -> None:
    cfg = load_config(environ={}, sets=DEV)
    assert isinstance(cfg, Config)
    assert (cfg.server.port, cfg.server.ws_path, cfg.api.host, cfg.api.port) == (8080, "/ws", "127.0.0.1", 8081)
    assert [r.pattern for r in cfg.routes] == [
        "live:{room_id}", "user:{user_id}", "cs:{session_id}", "dm:{a}:{b}", "group:{group_id}", "notice:{user_id}", "*"]
    assert [r.kind for r in cfg.routes if r.kind != "room"] == ["dm", "group", "notice"]
    assert cfg.node_id, "a node id is generated"


def test_toml_file(toml_file: Path) -> None:
    cfg = load_config(str(toml_file), environ={})
    assert cfg.node_id == "n7"
    assert cfg.server.port == 9001 and cfg.server.subprotocols == ["gateway.v1", "chat"]
    assert cfg.limits.queue_bytes == 524288
    assert cfg.hooks.timeout == 1.0 and isinstance(cfg.hooks.timeout, float)
    assert [r.pattern for r in cfg.routes] == ["live:{room_id}", "*"]
    assert cfg.routes[0].merge_ms == 50 and cfg.routes[0].user_rate == 2.5


def test_config_path_from_the_environment(toml_file: Path) -> None:
    cfg = load_config(environ={"GATEWAY_CONFIG": str(toml_file)})
    assert cfg.server.port == 9001


def test_environment_overrides_the_file(toml_file: Path) -> None:
    env = {
        "GATEWAY_SERVER__PORT": "9100",
        "GATEWAY_NODE_ID": "n9",
        "GATEWAY_HEARTBEAT__WS_PING": "false",
        "GATEWAY_SERVER__SUBPROTOCOLS": '["x.v1"]',
        "GATEWAY_AUTH__SECRET": "env-secret-env-secret-env-secret-12345",
        "OTHER": "ignored",
    }
    cfg = load_config(str(toml_file), environ=env)
    assert cfg.server.port == 9100 and cfg.node_id == "n9"
    assert cfg.heartbeat.ws_ping is False
    assert cfg.server.subprotocols == ["x.v1"]
    assert cfg.auth.secret == "env-secret-env-secret-env-secret-12345"
    assert cfg.limits.queue_bytes == 524288, "other file settings stay"


def test_a_string_setting_that_looks_like_a_number() -> None:
    cfg = load_config(environ={"GATEWAY_AUTH__SECRET": "12345678901234567890123456789012", "GATEWAY_NODE_ID": "42"})
    assert cfg.auth.mode == "jwt"
    assert cfg.auth.secret == "12345678901234567890123456789012"
    assert cfg.node_id == "42"
    cfg = load_config(environ={}, sets=["api.api_key=0042", *DEV])
    assert cfg.api.api_key == "0042"


def test_set_wins_over_environment_and_file(toml_file: Path) -> None:
    cfg = load_config(
        str(toml_file),
        environ={"GATEWAY_SERVER__PORT": "9100", "GATEWAY_LIMITS__MAX_ERRORS": "7"},
        sets=["server.port=9200", "heartbeat.interval=5", "heartbeat.idle_timeout=12.5", 'routes=[{pattern="*"}]'],
    )
    assert cfg.server.port == 9200
    assert cfg.limits.max_errors == 7
    assert (cfg.heartbeat.interval, cfg.heartbeat.idle_timeout) == (5, 12.5)
    assert [r.pattern for r in cfg.routes] == ["*"]
    # Named CLI flags (overrides) win over everything.
    cfg = load_config(str(toml_file), environ={"GATEWAY_SERVER__PORT": "9100"}, sets=["server.port=9200"], overrides={"server.port": 9300})
    assert cfg.server.port == 9300


@pytest.mark.parametrize(
    ("sets", "key", "words"),
    [
        (["server.port=70000"], "server.port", "0..65535"),
        (["server.port=\"80\""], "server.port", "must be int"),
        (["server.prot=1"], "server.prot", "unknown setting"),
        (["nosuch.key=1"], "nosuch", "unknown setting"),
        (["server=1"], "server", "must be a table"),
        (["heartbeat.interval=10", "heartbeat.idle_timeout=5"], "heartbeat.idle_timeout", "longer than"),
        (["hooks.fallback=maybe"], "hooks.fallback", "'allow' or 'deny'"),
        (["limits.queue_bytes=0"], "limits.queue_bytes", "> 0"),
        (["deflate.level=12"], "deflate.level", "0..9"),
        (["broker.node_timeout=0"], "broker.node_timeout", "> 0"),
        (["broker.leave_grace=-1"], "broker.leave_grace", ">= 0"),
        (["broker.archive_streams=-1"], "broker.archive_streams", "0..64"),
        (["broker.archive_streams=65"], "broker.archive_streams", "0..64"),
        (["broker.archive_maxlen=99"], "broker.archive_maxlen", ">= 100"),
        (["broker.archive_claim_after=0"], "broker.archive_claim_after", "> 0"),
        (["broker.archive_batch=0"], "broker.archive_batch", "1..10000"),
        (["api.host=0.0.0.0"], "api.api_key", "required"),
        (["auth.mode=jwt"], "auth.secret", "required"),
        (["auth.mode=magic"], "auth.mode", "must be one of"),
        (["server.workers=2"], "server.workers", "redis"),
        (['routes=[{pattern="live:{id}", join="friends"}]'], "routes[0].join", "must be one of"),
        (['routes=[{pattern="live:{id}", speed=3}]'], "routes[0].speed", "unknown setting"),
        (['routes=[{pattern="*"}, {pattern="*"}]'], "routes[1].pattern", "duplicate"),
        (["routes=5"], "routes", "array of tables"),
        (["novalue"], "--set", "section.key=value"),
        (["limits.socket_send_buffer=-1"], "limits.socket_send_buffer", ">= 0"),
        (["plugins.webhook=5"], "plugins.webhook", "must be a table"),
        (["plugins=3"], "plugins", "table of [plugins.<name>] tables"),
        (["outbox.endpoints=3"], "outbox.endpoints", "array of tables"),
        (['outbox.endpoints=[{name="crm", url="ftp://x"}]'], "outbox.endpoints[0].url", "http:// or https://"),
        (['outbox.endpoints=[{name="a b", url="http://x"}]'], "outbox.endpoints[0].name", "letters, digits"),
        (['outbox.endpoints=[{name="a", url="http://x"}, {name="a", url="http://y"}]'], "outbox.endpoints[1].name", "duplicate"),
        (['outbox.endpoints=[{name="a", url="http://x", events=["message", "typing"]}]'], "outbox.endpoints[0].events", "not 'typing'"),
        (['outbox.endpoints=[{name="a", url="http://x", secret_env="NO_SUCH_SECRET_VAR"}]'], "outbox.endpoints[0].secret_env", "not set"),
        (['outbox.endpoints=[{name="a", url="http://x", batch=0}]'], "outbox.endpoints[0].batch", "1..10000"),
        (['outbox.endpoints=[{name="a", url="http://x", colour=1}]'], "outbox.endpoints[0].colour", "unknown setting"),
        (["outbox.backoff_min=5", "outbox.backoff_max=1"], "outbox.backoff_max", ">= outbox.backoff_min"),
        (["outbox.dead_letter_after=0"], "outbox.dead_letter_after", "> 0"),
        (['routes=[{pattern="*"}]', 'store.kind="postgres"', 'outbox.endpoints=[{name="a", url="http://x"}]'], "store.dsn", "outbox endpoints are configured"),
    ],
)
def test_errors_name_the_bad_key(sets: list[str], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(environ={}, sets=(DEV if not any(x.startswith("auth.") for x in sets) else []) + sets)
    assert e.value.key == key, str(e.value)
    assert words in str(e.value)
    assert str(e.value).startswith(f"{key}: ")


def test_errors_from_the_environment_name_the_variable() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(environ={"GATEWAY_SERVER__PORT": "eighty", "GATEWAY_AUTH__MODE": "dev"})
    assert e.value.key == "server.port"
    assert "GATEWAY_SERVER__PORT" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(environ={"GATEWAY_SERVR__PORT": "1", "GATEWAY_AUTH__MODE": "dev"})
    assert e.value.key == "servr" and "GATEWAY_SERVR__PORT" in str(e.value)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path / "missing.toml"), environ={}, sets=DEV)
    assert e.value.key == "config" and "not found" in str(e.value)
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nport = 1")
    with pytest.raises(ConfigError) as e:
        load_config(str(bad), environ={}, sets=DEV)
    assert "not valid TOML" in str(e.value)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[server]\nport = 1\ncolour = 'blue'\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(unknown), environ={}, sets=DEV)
    assert e.value.key == "server.colour" and "known:" in str(e.value)


# ---- the CLI ---------------------------------------------------------------------------------


def test_check_config_command(toml_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-config", "--config", str(toml_file)]) == 0
    assert "ok: 2 routes" in capsys.readouterr().out
    assert cli.main(["check-config", "--config", str(toml_file), "--set", "server.port=-1"]) == 2
    assert "server.port" in capsys.readouterr().err


def test_run_reports_configuration_errors(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    assert cli.main(["run", "--set", "limits.max_errors=0"]) == 2
    assert "limits.max_errors" in capsys.readouterr().err


def test_token_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import jwt

    p = tmp_path / "g.toml"
    p.write_text('[auth]\nmode = "jwt"\nsecret = "k7Qp2-Zr9sX-4vLm8-Nt1wB-6yHc3-Jd0fG"\n')
    assert cli.main(["token", "alice", "--config", str(p), "--rooms", "cs:1"]) == 0
    token = capsys.readouterr().out.strip()
    claims = jwt.decode(token, "k7Qp2-Zr9sX-4vLm8-Nt1wB-6yHc3-Jd0fG", algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["rooms"] == ["cs:1"]


def test_dev_auth_only_when_asked_for(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """No silent dev auth: without --dev (or auth.mode = "dev") the gateway verifies JWTs
    and refuses to start without a key; check-config and run answer the same."""
    for k in [k for k in __import__("os").environ if k.startswith("GATEWAY_")]:
        monkeypatch.delenv(k)
    for cmd in (["run"], ["check-config"], ["run", "--workers", "2", "--broker", "redis"]):
        assert cli.main(cmd) == 2, cmd
        assert "auth.secret: required for HS256" in capsys.readouterr().err
    a = cli._parser().parse_args(["run", "--dev"])
    cfg = cli.resolve_config(a)
    assert (cfg.auth.mode, cfg.server.host) == ("dev", "127.0.0.1"), "--dev listens on loopback"
    assert cli.main(["check-config", "--dev"]) == 0
    assert "auth=dev, listening on 127.0.0.1:8080" in capsys.readouterr().out


def test_dev_auth_is_refused_on_a_public_address(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    for cmd in (["check-config", "--dev", "--host", "0.0.0.0"], ["run", "--set", "auth.mode=dev"], ["run", "--dev", "--set", "server.host=::"]):
        assert cli.main(cmd) == 2, cmd
        assert "auth.mode: 'dev' trusts ?user=" in capsys.readouterr().err
    monkeypatch.setenv("GATEWAY_SERVER__HOST", "10.0.0.5")
    assert cli.main(["check-config", "--dev"]) == 2
    assert "refused on server.host = '10.0.0.5'" in capsys.readouterr().err
    assert cli.main(["check-config", "--dev", "--set", "auth.dev_allow_remote=true"]) == 0, "a second, explicit setting allows it"


def test_load_app_factories(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    mod = tmp_path / "myapp_for_tests.py"
    mod.write_text(
        "from gateway.app import Gateway\n"
        "def with_config(config):\n    return Gateway(config)\n"
        "def without_config():\n    return Gateway()\n"
        "def broken(config):\n    raise TypeError('bug inside the factory')\n"
        "not_an_app = 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(environ={}, sets=[*DEV, "node_id=from-config"])
    assert cli.load_app("myapp_for_tests:with_config", cfg).node_id == "from-config"
    assert cli.load_app("myapp_for_tests:without_config", cfg).config is not cfg
    with pytest.raises(TypeError, match="bug inside the factory"):
        cli.load_app("myapp_for_tests:broken", cfg)
    for spec in ("myapp_for_tests:not_an_app", "myapp_for_tests:missing", "no_such_module_x:app", "nocolon"):
        with pytest.raises(ConfigError) as e:
            cli.load_app(spec, cfg)
        assert e.value.key == "--app"


# ---- plugin settings and the socket send buffer ----------------------------------------------


def test_plugin_tables_are_free_form(tmp_path: Path) -> None:
    f = tmp_path / "gw.toml"
    f.write_text(
        '[server]\nhost = "127.0.0.1"\n\n[auth]\nmode = "dev"\n\n'
        '[plugins.webhook]\nurl = "http://backend:9000/events"\ntypes = ["chat", "gift"]\nretry = { max = 5, base = 0.5 }\n\n'
        "[plugins.wordfilter]\nmode = \"mask\"\n"
    )
    env = {"GATEWAY_PLUGINS__WEBHOOK__WORKERS": "4", "GATEWAY_PLUGINS__AUDIT__ROOM": "audit:all"}
    cfg = load_config(str(f), environ=env, sets=["plugins.wordfilter.mode=reject", 'plugins.wordfilter.secret="123"'])
    assert cfg.plugins == {
        "webhook": {"url": "http://backend:9000/events", "types": ["chat", "gift"], "retry": {"max": 5, "base": 0.5}, "workers": 4},
        "wordfilter": {"mode": "reject", "secret": "123"},
        "audit": {"room": "audit:all"},
    }
    assert load_config(environ={}, sets=DEV).plugins == {}


def test_engine_settings_have_one_name_on_both_sides() -> None:
    """Each engine setting reaches Engine(...) as <section>_<key>, unchanged, and the
    engine knows every one of them (an unknown keyword is a TypeError)."""
    from gateway._core import Engine

    cfg = load_config(environ={}, sets=[*DEV, "limits.socket_send_buffer=262144", "server.io_threads=3", "limits.max_rooms_per_conn=7"])
    kw = cfg.engine_settings()
    assert kw["limits_socket_send_buffer"] == 262144 and kw["server_io_threads"] == 3 and kw["limits_max_rooms_per_conn"] == 7
    assert kw["auth_deadline"] == cfg.auth.deadline and kw["deflate_enabled"] is True
    assert "server_workers" not in kw and "limits_max_errors" not in kw, "Python-only settings stay in Python"
    Engine(**kw)
    with pytest.raises(TypeError):
        Engine(limits_no_such_setting=1)
    assert load_config(environ={}, sets=DEV).engine_settings()["limits_socket_send_buffer"] == 0


def test_renamed_keys_still_load(caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(environ={}, sets=[*DEV, "server.threads=2"])
    assert cfg.server.io_threads == 2
    assert "server.threads is deprecated: use server.io_threads" in caplog.text


def test_a_plugin_rejecting_its_settings_is_a_configuration_error(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    (tmp_path / "strict_plugin_app.py").write_text(
        "from gateway.app import Gateway, Plugin\n"
        "from gateway.auth import ConfigError\n"
        "class Strict(Plugin):\n"
        "    name = 'strict'\n"
        "    def setup(self, gateway):\n"
        "        url = gateway.config.plugins.get(self.name, {}).get('url')\n"
        "        if not isinstance(url, str):\n"
        "            raise ConfigError('plugins.strict.url', 'required')\n"
        "def make_app(config):\n"
        "    return Gateway(config, plugins=[Strict()])\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH", "")]))
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "--app", "strict_plugin_app:make_app", "--dev",
         "--set", "server.port=0", "--set", "api.enabled=false", "--set", "plugins.strict.urll=x"],
        env=env, capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 2, r.stderr
    assert "configuration error: plugins.strict.url: required" in r.stderr


def test_the_example_config_shows_every_setting() -> None:
    """gateway.example.toml is where docs/operations.md sends readers for every key: each
    section's settings appear in it (set, or commented out with their meaning)."""
    import dataclasses
    import re

    text = (Path(__file__).resolve().parents[2] / "gateway.example.toml").read_text()
    sections = dict(re.findall(r"^\[([\w.]+)\]\n(.*?)(?=^\[|\Z)", text, re.S | re.M))
    missing: list[str] = []

    def check(name: str, section: object) -> None:
        body = sections.get(name, "")
        for sf in dataclasses.fields(section):  # type: ignore[arg-type]
            value = getattr(section, sf.name)
            if dataclasses.is_dataclass(value):
                check(f"{name}.{sf.name}", value)  # its own [section.sub] table
            elif not re.search(rf"^#? ?{sf.name} = ", body, re.M):
                missing.append(f"{name}.{sf.name}")

    for f in dataclasses.fields(Config):
        section = getattr(Config(), f.name)
        if dataclasses.is_dataclass(section):
            check(f.name, section)
    assert not missing, f"not in gateway.example.toml: {missing}"
