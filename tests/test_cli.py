"""The ``channelbus broker`` command: option parsing first, then real broker processes.

Parsing tests run the whole command through click's CliRunner with ``run_broker`` replaced by a
recorder, so they see the exact BrokerConfig the command would serve and never open a socket.
The process tests start ``python -m consumers.cli broker`` on ports the OS picks and stop every
process they start by PID.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.config import BrokerConfig, ConfigError, load_toml, parse_size
from clients import Client, LimitExceeded, MessageTooLarge
from consumers import cli

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024

OPTIONS = {  # long option -> (BrokerConfig field, environment variable)
    "--bind": ("bind", "CHANNELBUS_BIND"),
    "--pub-bind": ("pub_bind", "CHANNELBUS_PUB_BIND"),
    "--advertise": ("advertise", "CHANNELBUS_ADVERTISE"),
    "--max-capacity": ("max_capacity", "CHANNELBUS_MAX_CAPACITY"),
    "--max-expiry": ("max_expiry", "CHANNELBUS_MAX_EXPIRY"),
    "--max-group-expiry": ("max_group_expiry", "CHANNELBUS_MAX_GROUP_EXPIRY"),
    "--max-message-size": ("max_message_size", "CHANNELBUS_MAX_MESSAGE_SIZE"),
    "--max-bad-frames": ("max_bad_frames", "CHANNELBUS_MAX_BAD_FRAMES"),
    "--max-memory": ("max_memory", "CHANNELBUS_MAX_MEMORY"),
    "--heartbeat": ("heartbeat", "CHANNELBUS_HEARTBEAT"),
    "--busy-poll": ("busy_poll", "CHANNELBUS_BUSY_POLL"),
    "--check": ("check", "CHANNELBUS_CHECK"),
    "--secret-key": ("secret_key", "CHANNELBUS_BROKER_SECRET_KEY"),
    "--authorized-keys": ("authorized_keys", "CHANNELBUS_AUTHORIZED_KEYS"),
    "--permissions": ("permissions", "CHANNELBUS_PERMISSIONS"),
    "--insecure": ("insecure", "CHANNELBUS_INSECURE"),
    "--metrics": ("metrics", "CHANNELBUS_METRICS"),
    "--log-level": ("log_level", "CHANNELBUS_LOG_LEVEL"),
}

# One non-default value per setting: (long option, text as typed, value in BrokerConfig).
VALUES = [
    ("--bind", "tcp://127.0.0.2:6000", "tcp://127.0.0.2:6000"),
    ("--pub-bind", "ipc:///tmp/channelbus-pub", "ipc:///tmp/channelbus-pub"),
    ("--advertise", "tcp://bus.example.com:6001", "tcp://bus.example.com:6001"),
    ("--max-capacity", "500", 500),
    ("--max-expiry", "30.5", 30.5),
    ("--max-group-expiry", "3600", 3600.0),
    ("--max-message-size", "2MiB", 2 * MiB),
    ("--max-bad-frames", "7", 7),
    ("--max-memory", "64MiB", 64 * MiB),
    ("--heartbeat", "0.5", 0.5),
    ("--busy-poll", "250", 250),
    ("--metrics", "127.0.0.1:9464", "127.0.0.1:9464"),
    ("--log-level", "debug", "DEBUG"),
]


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No CHANNELBUS_* variable of the machine running the tests leaks into them."""
    for name in list(os.environ):
        if name.startswith("CHANNELBUS_"):
            monkeypatch.delenv(name)


@pytest.fixture
def served(monkeypatch):
    """Replace run_broker with a recorder: the configs the command would have served."""
    configs: list[BrokerConfig] = []
    monkeypatch.setattr(cli, "run_broker", configs.append)
    return configs


@pytest.fixture
def invoke(served):
    """Run ``channelbus broker ARGS`` in process; return (result, config or None)."""

    def run(*args: str, env: dict | None = None):
        result = CliRunner().invoke(cli.main, ["broker", *args], env=env)
        assert len(served) <= 1
        return result, (served.pop() if served else None)

    return run


@pytest.fixture
def resolve(invoke):
    """The BrokerConfig ``channelbus broker ARGS`` resolves to; fails the test on a usage error."""

    def run(*args: str, env: dict | None = None) -> BrokerConfig:
        result, config = invoke(*args, env=env)
        assert result.exit_code == 0, result.output
        assert config is not None
        return config

    return run


@pytest.fixture
def toml_file(tmp_path):
    def write(text: str) -> str:
        path = tmp_path / "channelbus.toml"
        path.write_text(text)
        return str(path)

    return write


def error_line(result) -> str:
    """The one ``Error:`` line of a usage error; asserts exit status 2 and no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.rstrip("\n").splitlines()[-1] == errors[0]
    return errors[0]


# -- help and defaults ----------------------------------------------------------------------


def test_help_lists_every_option_with_help_text_and_env_var():
    result = CliRunner().invoke(cli.main, ["broker", "--help"])
    assert result.exit_code == 0
    help_text = " ".join(result.output.split())  # undo click's wrapping
    params = {p.opts[0]: p for p in cli.broker.params if p.name != "help"}
    assert set(params) == {"--config", *OPTIONS}
    for option, param in params.items():
        assert param.help, f"{option} has no help text"
        envvar = "CHANNELBUS_CONFIG" if option == "--config" else OPTIONS[option][1]
        assert param.envvar == envvar
        assert option in help_text
        assert " ".join(param.help.split()) in help_text
        assert f"env var: {envvar}" in help_text


def test_main_help_lists_the_broker_command():
    result = CliRunner().invoke(cli.main, ["--help"])
    assert result.exit_code == 0
    assert re.search(r"^\s+broker\s+Run a broker", result.output, re.MULTILINE)


def test_defaults_bind_loopback_ports_5555_and_5556_with_a_1_mib_message_limit(resolve):
    config = resolve()
    assert config.bind == "tcp://127.0.0.1:5555"
    assert config.pub_bind == "tcp://127.0.0.1:5556"
    assert config.max_message_size == MiB
    assert config == BrokerConfig()
    assert config == BrokerConfig(
        bind="tcp://127.0.0.1:5555", pub_bind="tcp://127.0.0.1:5556", advertise=None,
        max_capacity=100_000, max_expiry=86400.0, max_group_expiry=604800.0,
        max_message_size=MiB, max_bad_frames=100, log_level="INFO",
    )


# -- each flag, each environment variable ---------------------------------------------------


@pytest.mark.parametrize("option, text, expected", VALUES, ids=[v[0] for v in VALUES])
def test_each_flag_sets_its_setting_and_nothing_else(resolve, option, text, expected):
    field = OPTIONS[option][0]
    config = resolve(option, text)
    assert getattr(config, field) == expected
    assert config == BrokerConfig(**{field: expected})


@pytest.mark.parametrize("option, text, expected", VALUES, ids=[OPTIONS[v[0]][1] for v in VALUES])
def test_each_env_var_sets_its_setting_and_nothing_else(resolve, option, text, expected):
    field, envvar = OPTIONS[option]
    config = resolve(env={envvar: text})
    assert getattr(config, field) == expected
    assert config == BrokerConfig(**{field: expected})


def test_config_env_var_names_the_toml_file(resolve, toml_file):
    path = toml_file("max-capacity = 42\n")
    assert resolve(env={"CHANNELBUS_CONFIG": path}).max_capacity == 42


@pytest.mark.parametrize("text", ["WARNING", "warning", "Warning"])
def test_log_level_ignores_case(resolve, text):
    assert resolve("--log-level", text).log_level == "WARNING"


@pytest.mark.parametrize("text, size", [
    ("1048576", MiB), ("512KiB", 512 * 1024), ("512k", 512 * 1024), ("1kb", 1000),
    ("2MiB", 2 * MiB), ("3 mb", 3_000_000), ("1GiB", 1024**3), ("10b", 10),
])
def test_max_message_size_takes_bytes_or_a_unit(resolve, text, size):
    assert resolve("--max-message-size", text).max_message_size == size


def test_check_mode_is_off_by_default_and_set_by_flag_env_or_file(resolve, toml_file):
    assert resolve().check is False
    assert resolve("--check").check is True
    assert resolve("--check", "--no-check").check is False
    assert resolve(env={"CHANNELBUS_CHECK": "1"}).check is True
    assert resolve(env={"CHANNELBUS_CHECK": "true"}).check is True
    assert resolve(env={"CHANNELBUS_CHECK": "0"}).check is False
    path = toml_file("check = true\n")
    assert resolve("--config", path).check is True
    assert resolve("--config", path, env={"CHANNELBUS_CHECK": "0"}).check is False
    assert resolve("--config", path, "--no-check", env={"CHANNELBUS_CHECK": "1"}).check is False
    assert resolve("--check") == BrokerConfig(check=True)


def test_a_check_mode_that_is_not_a_boolean_is_refused(invoke, toml_file):
    result, config = invoke(env={"CHANNELBUS_CHECK": "maybe"})
    assert config is None and "'maybe' is not a valid boolean" in error_line(result)
    result, config = invoke("--config", toml_file('check = "often"\n'))
    assert config is None and "check" in error_line(result)
    with pytest.raises(ConfigError, match="check must be true or false"):
        BrokerConfig(check=1)


def test_bind_accepts_any_port_and_any_host(resolve):
    config = resolve("--bind", "tcp://*:*", "--pub-bind", "tcp://lo:6001", "--insecure")
    assert (config.bind, config.pub_bind) == ("tcp://*:*", "tcp://lo:6001")


# -- the TOML file --------------------------------------------------------------------------

FULL_TOML_DASHED = """
bind = "tcp://0.0.0.0:6000"
pub-bind = "tcp://0.0.0.0:6001"
advertise = "tcp://bus.example.com:6001"
max-capacity = 500
max-expiry = 30
max-group-expiry = 3600.5
max-message-size = "2MiB"
max-bad-frames = 7
busy-poll = 300
check = true
insecure = true
metrics = "[::1]:9464"
log-level = "debug"
"""
FULL_CONFIG = BrokerConfig(
    bind="tcp://0.0.0.0:6000", pub_bind="tcp://0.0.0.0:6001", advertise="tcp://bus.example.com:6001",
    max_capacity=500, max_expiry=30.0, max_group_expiry=3600.5, max_message_size=2 * MiB,
    max_bad_frames=7, busy_poll=300, check=True, insecure=True, metrics="[::1]:9464", log_level="DEBUG",
)


def test_toml_file_sets_every_setting_at_the_top_level(resolve, toml_file):
    assert resolve("--config", toml_file(FULL_TOML_DASHED)) == FULL_CONFIG


def test_toml_file_sets_every_setting_under_a_broker_table(resolve, toml_file):
    assert resolve("--config", toml_file("[broker]\n" + FULL_TOML_DASHED)) == FULL_CONFIG


def test_toml_keys_may_use_underscores(resolve, toml_file):
    text = "[broker]\n" + re.sub(r"^([a-z-]+) =", lambda m: m[1].replace("-", "_") + " =",
                                 FULL_TOML_DASHED, flags=re.MULTILINE)
    assert "max_group_expiry = 3600.5" in text
    assert resolve("--config", toml_file(text)) == FULL_CONFIG


def test_toml_top_level_and_broker_table_combine(resolve, toml_file):
    path = toml_file('max-capacity = 5\n\n[broker]\nmax-bad-frames = 3\n')
    config = resolve("--config", path)
    assert (config.max_capacity, config.max_bad_frames) == (5, 3)


@pytest.mark.parametrize("value, size", [('"2MiB"', 2 * MiB), ("4096", 4096), ('"512 KiB"', 512 * 1024)])
def test_toml_sizes_are_bytes_or_strings_with_a_unit(resolve, toml_file, value, size):
    path = toml_file(f"max-message-size = {value}\n")
    assert resolve("--config", path).max_message_size == size


def test_toml_unknown_key_is_an_error_naming_the_known_keys(invoke, toml_file):
    path = toml_file("[broker]\nmax-capacty = 5\n")
    result, config = invoke("--config", path)
    line = error_line(result)
    assert config is None
    assert path in line and "'max-capacty'" in line
    for key in ("bind", "pub-bind", "advertise", "max-capacity", "max-expiry", "max-group-expiry",
                "max-message-size", "max-bad-frames", "busy-poll", "check", "log-level"):
        assert key in line


def test_toml_unknown_table_is_an_error(invoke, toml_file):
    result, _ = invoke("--config", toml_file("[borker]\nbind = 'tcp://127.0.0.1:1'\n"))
    assert "unknown setting 'borker'" in error_line(result)


def test_toml_setting_given_twice_is_an_error(invoke, toml_file):
    result, _ = invoke("--config", toml_file("max-capacity = 5\n[broker]\nmax_capacity = 6\n"))
    assert "'max_capacity' is set twice" in error_line(result)


def test_missing_toml_file_is_a_clear_error(invoke, tmp_path):
    path = tmp_path / "absent.toml"
    result, _ = invoke("--config", str(path))
    line = error_line(result)
    assert f"cannot read config file {path}: No such file or directory" in line


def test_invalid_toml_is_a_clear_error(invoke, toml_file):
    path = toml_file("max-capacity = = 5\n")
    result, _ = invoke("--config", path)
    assert f"config file {path} is not valid TOML" in error_line(result)


@pytest.mark.parametrize("text, complaint", [
    ("max-capacity = -5", "max-capacity: -5 is not in the range x>=1"),
    ("max-capacity = 1.5", "max-capacity: 1.5 is not a whole number"),
    ("max-bad-frames = true", "max-bad-frames: True is not a whole number"),
    ("busy-poll = 2.5", "busy-poll: 2.5 is not a whole number"),
    ("busy-poll = 100000", "busy-poll: 100000 is not in the range 0<=x<=10000"),
    ("max-expiry = 0", "max-expiry: 0.0 is not in the range x>0"),
    ("max-group-expiry = nan", "max-group-expiry: nan is not a finite number of seconds"),
    ("max-message-size = '2 parsecs'", "max-message-size: '2 parsecs' is not a size"),
    ("bind = 'localhost:5555'", "bind: 'localhost:5555' is not an endpoint"),
    ("log-level = 'loud'", "log-level:"),
])
def test_bad_value_in_toml_file_names_the_file_and_the_key(invoke, toml_file, text, complaint):
    path = toml_file(text + "\n")
    result, config = invoke("--config", path)
    line = error_line(result)
    assert config is None
    assert f"config file {path}: {complaint}" in line


def test_load_toml_returns_field_names_and_raw_values(toml_file):
    path = toml_file('pub-bind = "tcp://*:1"\n[broker]\nmax_message_size = "1k"\n')
    assert load_toml(path) == {"pub_bind": "tcp://*:1", "max_message_size": "1k"}


# -- precedence: flag > env > file > default ------------------------------------------------

PRECEDENCE = [  # option, file value (TOML), env value, flag value, parsed: default/file/env/flag
    ("--bind", '"tcp://127.0.0.1:7001"', "tcp://127.0.0.1:7002", "tcp://127.0.0.1:7003",
     ("tcp://127.0.0.1:5555", "tcp://127.0.0.1:7001", "tcp://127.0.0.1:7002", "tcp://127.0.0.1:7003")),
    ("--pub-bind", '"tcp://127.0.0.1:7001"', "tcp://127.0.0.1:7002", "tcp://127.0.0.1:7003",
     ("tcp://127.0.0.1:5556", "tcp://127.0.0.1:7001", "tcp://127.0.0.1:7002", "tcp://127.0.0.1:7003")),
    ("--advertise", '"tcp://a:1"', "tcp://b:2", "tcp://c:3", (None, "tcp://a:1", "tcp://b:2", "tcp://c:3")),
    ("--max-capacity", "10", "20", "30", (100_000, 10, 20, 30)),
    ("--max-expiry", "10", "20", "30", (86400.0, 10.0, 20.0, 30.0)),
    ("--max-group-expiry", "10", "20", "30", (604800.0, 10.0, 20.0, 30.0)),
    ("--max-message-size", '"1KiB"', "2KiB", "3KiB", (MiB, 1024, 2048, 3072)),
    ("--max-bad-frames", "10", "20", "30", (100, 10, 20, 30)),
    ("--max-memory", '"1MiB"', "2MiB", "3MiB", (512 * MiB, MiB, 2 * MiB, 3 * MiB)),
    ("--heartbeat", "2", "3", "4", (1.0, 2.0, 3.0, 4.0)),
    ("--busy-poll", "100", "200", "0", (0, 100, 200, 0)),
    ("--log-level", '"error"', "warning", "debug", ("INFO", "ERROR", "WARNING", "DEBUG")),
]


@pytest.mark.parametrize("option, in_file, in_env, on_flag, expected", PRECEDENCE,
                         ids=[p[0] for p in PRECEDENCE])
def test_flag_beats_env_beats_file_beats_default(resolve, toml_file, option, in_file, in_env, on_flag,
                                                 expected):
    field, envvar = OPTIONS[option]
    path = toml_file(f"[broker]\n{field} = {in_file}\n")
    env = {envvar: in_env}
    default, from_file, from_env, from_flag = expected
    assert getattr(resolve(), field) == default
    assert getattr(resolve("--config", path), field) == from_file
    assert getattr(resolve("--config", path, env=env), field) == from_env
    assert getattr(resolve("--config", path, option, on_flag, env=env), field) == from_flag
    # The file named by CHANNELBUS_CONFIG ranks the same as --config.
    assert getattr(resolve(env={"CHANNELBUS_CONFIG": path}), field) == from_file
    assert getattr(resolve(env={"CHANNELBUS_CONFIG": path, envvar: in_env}), field) == from_env


def test_config_flag_order_does_not_matter(resolve, toml_file):
    path = toml_file("max-capacity = 10\nmax-bad-frames = 10\n")
    config = resolve("--max-capacity", "30", "--config", path)
    assert (config.max_capacity, config.max_bad_frames) == (30, 10)


# -- bad values -----------------------------------------------------------------------------

BAD = [
    ("--bind", "localhost:5555", "is not an endpoint"),
    ("--bind", "udp://127.0.0.1:5555", "is not an endpoint"),
    ("--bind", "inproc://bus", "is not an endpoint"),
    ("--bind", "tcp://", "is not an endpoint"),
    ("--bind", "tcp://127.0.0.1", "needs a host and a port"),
    ("--bind", "tcp://:5555", "needs a host and a port"),
    ("--bind", "tcp://127.0.0.1:0", "needs a host and a port"),
    ("--bind", "tcp://127.0.0.1:65536", "needs a host and a port"),
    ("--pub-bind", "tcp://127.0.0.1:-1", "needs a host and a port"),
    ("--advertise", "tcp://bus.example.com:*", "needs a host and a port from 1 to 65535,"),
    ("--advertise", "bus.example.com", "is not an endpoint"),
    ("--max-message-size", "0", "size must be at least 1 byte"),
    ("--max-message-size", "-1", "is not a size"),
    ("--max-message-size", "1.5MiB", "is not a size"),
    ("--max-message-size", "2 parsecs", "is not a size"),
    ("--max-capacity", "-1", "-1 is not in the range x>=1"),
    ("--max-capacity", "0", "0 is not in the range x>=1"),
    ("--max-capacity", "1.5", "is not a valid integer"),
    ("--max-bad-frames", "-3", "-3 is not in the range x>=1"),
    ("--max-expiry", "-1", "-1.0 is not in the range x>0"),
    ("--max-expiry", "0", "0.0 is not in the range x>0"),
    ("--max-expiry", "nan", "is not a finite number of seconds"),
    ("--max-group-expiry", "inf", "is not a finite number of seconds"),
    ("--max-group-expiry", "soon", "is not a valid float"),
    ("--busy-poll", "-1", "-1 is not in the range 0<=x<=10000"),
    ("--busy-poll", "10001", "10001 is not in the range 0<=x<=10000"),
    ("--busy-poll", "0.5", "is not a valid integer"),
    ("--log-level", "loud", "'loud' is not one of"),
]


@pytest.mark.parametrize("option, text, complaint", BAD, ids=[f"{b[0]}={b[1]}" for b in BAD])
def test_bad_flag_value_exits_2_with_a_one_line_error(invoke, option, text, complaint):
    result, config = invoke(f"{option}={text}")
    line = error_line(result)
    assert config is None
    assert f"Invalid value for '{option}'" in line
    assert complaint in line


@pytest.mark.parametrize("option, text, complaint", BAD[::3], ids=[f"{OPTIONS[b[0]][1]}={b[1]}" for b in BAD[::3]])
def test_bad_env_value_exits_2_with_a_one_line_error(invoke, option, text, complaint):
    result, config = invoke(env={OPTIONS[option][1]: text})
    line = error_line(result)
    assert config is None
    assert f"Invalid value for '{option}' (env var: '{OPTIONS[option][1]}')" in line
    assert complaint in line


def test_unknown_option_exits_2(invoke):
    result, config = invoke("--max-capcity", "5")
    line = error_line(result)
    assert "No such option" in line and "--max-capcity" in line
    assert config is None


# -- the library half: BrokerConfig and parse_size refuse what the CLI refuses --------------


@pytest.mark.parametrize("field, value", [
    ("bind", "localhost:5555"), ("max_capacity", 0), ("max_capacity", 1.5), ("max_capacity", True),
    ("max_expiry", 0), ("max_expiry", float("nan")), ("max_group_expiry", float("inf")),
    ("max_message_size", -1), ("max_bad_frames", 0), ("log_level", "loud"),
    ("busy_poll", -1), ("busy_poll", 10_001), ("busy_poll", 2.5), ("busy_poll", True),
])
def test_broker_config_refuses_bad_values(field, value):
    with pytest.raises(ConfigError, match=field):
        BrokerConfig(**{field: value})


@pytest.mark.parametrize("value", ["", "MiB", "1.5k", "-5", True, 0, "1 parsec"])
def test_parse_size_refuses_what_is_not_a_size(value):
    with pytest.raises(ConfigError):
        parse_size(value)


# -- real broker processes ------------------------------------------------------------------

LISTENING = re.compile(
    r"^channelbus broker listening on (tcp://127\.0\.0\.1:\d+), publishing on (tcp://127\.0\.0\.1:\d+)$",
    re.MULTILINE,
)
ANY_PORT = "tcp://127.0.0.1:*"


class BrokerProcess:
    def __init__(self, proc: subprocess.Popen, out: Path, err: Path) -> None:
        self.proc, self.out, self.err = proc, out, err
        self.endpoint = self.pub_endpoint = ""

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def wait_listening(self, timeout: float = 15.0) -> "BrokerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = LISTENING.search(self.stdout())
            if match:
                self.endpoint, self.pub_endpoint = match.groups()
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        pytest.fail(f"broker did not report listening (exit {self.proc.poll()}):\n"
                    f"stdout: {self.stdout()!r}\nstderr: {self.stderr()}")

    def wait(self, timeout: float = 5.0) -> int:
        return self.proc.wait(timeout=timeout)


@pytest.fixture
def start_broker(tmp_path):
    """Start ``python -m consumers.cli broker ARGS``; every process is stopped in teardown."""
    procs: list[subprocess.Popen] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHANNELBUS_")}
    env["CHANNELBUS_CHECK"] = "1"  # (as every broker of the suite: conftest)

    def start(*args: str, extra_env: dict | None = None) -> BrokerProcess:
        n = len(procs)
        out, err = tmp_path / f"broker{n}.out", tmp_path / f"broker{n}.err"
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "consumers.cli", "broker", *args],
                cwd=REPO, env={**env, **(extra_env or {})},
                stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
            )
        procs.append(proc)
        return BrokerProcess(proc, out, err)

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)


@pytest.mark.timeout(30)
def test_broker_process_reports_the_ports_it_bound_and_routes_messages(start_broker):
    broker = start_broker("--bind", ANY_PORT, "--pub-bind", ANY_PORT).wait_listening()
    assert broker.endpoint != broker.pub_endpoint
    with Client(broker.endpoint, timeout=5) as sender, Client(broker.endpoint, timeout=5) as receiver:
        sender.send("tasks", {"type": "job", "n": 1, "blob": b"\x00\xff"})
        assert receiver.receive("tasks", timeout=5) == {"type": "job", "n": 1, "blob": b"\x00\xff"}
        me = receiver.new_channel()
        receiver.group_add("room", me)  # returns once the publisher port delivered its marker
        sender.group_send("room", {"type": "chat.message", "text": "hi"})
        assert receiver.receive(me, timeout=5) == {"type": "chat.message", "text": "hi"}


@pytest.mark.timeout(30)
def test_broker_process_enforces_ceilings_given_as_flags(start_broker):
    broker = start_broker("--bind", ANY_PORT, "--pub-bind", ANY_PORT, "--max-capacity", "7",
                          "--max-message-size", "1KiB").wait_listening()
    with pytest.raises(LimitExceeded) as raised:
        Client(broker.endpoint, timeout=5, capacity=8)
    assert (raised.value.name, raised.value.limit) == ("capacity", 7)
    with Client(broker.endpoint, timeout=5, capacity=7) as client:
        with pytest.raises(MessageTooLarge):
            client.send("tasks", {"type": "big", "data": b"x" * 2000})


@pytest.mark.timeout(30)
def test_broker_process_reads_env_vars_and_the_config_file(start_broker, tmp_path):
    config = tmp_path / "broker.toml"
    config.write_text('[broker]\nmax-expiry = 5\nmax-capacity = 3\n')
    broker = start_broker(extra_env={
        "CHANNELBUS_BIND": ANY_PORT, "CHANNELBUS_PUB_BIND": ANY_PORT,
        "CHANNELBUS_CONFIG": str(config), "CHANNELBUS_MAX_CAPACITY": "9",
    }).wait_listening()
    with pytest.raises(LimitExceeded) as raised:
        Client(broker.endpoint, timeout=5, capacity=9, expiry=6)
    assert (raised.value.name, raised.value.limit) == ("expiry", 5)
    Client(broker.endpoint, timeout=5, capacity=9, expiry=5).close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_broker_process_with_status_0(start_broker, signum):
    broker = start_broker("--bind", ANY_PORT, "--pub-bind", ANY_PORT).wait_listening()
    with Client(broker.endpoint, timeout=5) as client:
        client.ping()
    broker.proc.send_signal(signum)
    assert broker.wait(timeout=5) == 0
    assert "Traceback" not in broker.stderr()
    assert "channelbus broker stopped" in broker.stderr()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("taken", ["bind", "pub-bind"])
def test_second_broker_on_a_taken_port_exits_2_with_a_one_line_error(start_broker, taken):
    first = start_broker("--bind", ANY_PORT, "--pub-bind", ANY_PORT).wait_listening()
    port = first.endpoint if taken == "bind" else first.pub_endpoint
    args = {"bind": ANY_PORT, "pub-bind": ANY_PORT, taken: port}
    second = start_broker("--bind", args["bind"], "--pub-bind", args["pub-bind"])
    assert second.wait(timeout=10) == 2
    assert second.stdout() == ""
    assert second.stderr() == f"Error: cannot bind {port}: address already in use\n"
    # The first broker is unharmed.
    with Client(first.endpoint, timeout=5) as client:
        client.ping()
