"""Command and environment rules of DESIGN.md §5, checked against what `docker run` does."""
from __future__ import annotations

import pytest

from common.enclave.launch import DEFAULT_PATH, cmd_file, env_file, launch_spec
from common.errors import InvalidOptions, NoCommand

CONFIG = {
    "Entrypoint": ["/bin/app", "--serve"],
    "Cmd": ["--port", "80"],
    "Env": ["PATH=/opt/bin:/bin", "A=1", "B=2"],
    "WorkingDir": "/srv",
    "User": "app:app",
}


def test_launch_spec_joins_entrypoint_and_cmd_like_docker():
    spec = launch_spec(CONFIG)
    assert spec.argv == ("/bin/app", "--serve", "--port", "80")
    assert spec.env == ("PATH=/opt/bin:/bin", "A=1", "B=2")
    assert (spec.workdir, spec.user) == ("/srv", "app:app")


def test_launch_spec_cmd_only_image_runs_cmd():
    assert launch_spec({"Cmd": ["sh", "-c", "echo hi"]}).argv == ("sh", "-c", "echo hi")


def test_launch_spec_entrypoint_override_drops_image_cmd():
    assert launch_spec(CONFIG, entrypoint=["/bin/other"]).argv == ("/bin/other",)


def test_launch_spec_entrypoint_override_with_args():
    spec = launch_spec(CONFIG, entrypoint=["/bin/other"], entrypoint_args=["x", "y"])
    assert spec.argv == ("/bin/other", "x", "y")


def test_launch_spec_args_override_replaces_cmd_keeps_entrypoint():
    assert launch_spec(CONFIG, entrypoint_args=["--debug"]).argv == ("/bin/app", "--serve", "--debug")


def test_launch_spec_env_vars_after_image_env_later_wins_in_place():
    spec = launch_spec(CONFIG, env_vars=["B=20", "C=3", "A=10"])
    assert spec.env == ("PATH=/opt/bin:/bin", "A=10", "B=20", "C=3")


def test_launch_spec_value_may_contain_equals_and_be_empty():
    spec = launch_spec({"Cmd": ["x"], "Env": ["PATH=/bin"]}, env_vars=["Q=a=b", "E="])
    assert spec.env[-2:] == ("Q=a=b", "E=")


def test_launch_spec_adds_docker_default_path_when_image_has_none():
    spec = launch_spec({"Cmd": ["x"], "Env": ["A=1"]})
    assert spec.env == (DEFAULT_PATH, "A=1")


def test_launch_spec_defaults_workdir_root_and_user_empty():
    spec = launch_spec({"Cmd": ["x"]})
    assert (spec.workdir, spec.user) == ("/", "")


def test_launch_spec_no_command_is_an_error():
    with pytest.raises(NoCommand) as info:
        launch_spec({"Env": ["A=1"]})
    assert info.value.code == "no_command"


@pytest.mark.parametrize("bad", ["NOEQUALS", "=value", ""])
def test_launch_spec_rejects_malformed_env(bad):
    with pytest.raises(InvalidOptions) as info:
        launch_spec({"Cmd": ["x"]}, env_vars=[bad])
    assert info.value.details["field"] == "env_vars"


def test_launch_spec_rejects_newline_in_argv_or_env():
    with pytest.raises(InvalidOptions):
        launch_spec({"Cmd": ["echo", "a\nb"]})
    with pytest.raises(InvalidOptions):
        launch_spec({"Cmd": ["x"]}, env_vars=["A=1\nB=2"])


def test_launch_spec_keeps_shell_metacharacters_as_data():
    spec = launch_spec({"Cmd": ["sh", "-c", "echo $(id) `x` ; rm -rf /"]})
    assert cmd_file(spec) == b"sh\n-c\necho $(id) `x` ; rm -rf /\n"


def test_launch_spec_rejects_non_list_config_fields():
    with pytest.raises(InvalidOptions):
        launch_spec({"Cmd": "echo hi"})


def test_cmd_and_env_files_one_item_per_line():
    spec = launch_spec({"Cmd": ["/bin/hello.sh"], "Env": ["PATH=/bin", "HELLO=Hello from the enclave side!"]})
    assert cmd_file(spec) == b"/bin/hello.sh\n"
    assert env_file(spec) == b"PATH=/bin\nHELLO=Hello from the enclave side!\n"
