"""One source per setting: every environment variable is declared in and read through
``pdbus/envs.py`` (an AST walk over production code; no process)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pdbus import envs

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pdbus", "actors", "native")
_OS_ENV = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}


def _production_trees():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(encoding="utf-8"), str(path))


def test_os_environ_is_read_only_in_envs():
    found = []
    for rel, tree in _production_trees():
        if rel == "pdbus/envs.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in _OS_ENV and isinstance(node.value, ast.Name) and node.value.id == "os":
                found.append(f"{rel}:{node.lineno} os.{node.attr}")
            elif isinstance(node, ast.ImportFrom) and node.module == "os":
                found += [f"{rel}:{node.lineno} from os import {a.name}" for a in node.names if a.name in _OS_ENV]
    assert not found, "read the environment through pdbus/envs.py: " + ", ".join(found)


def test_every_variable_named_in_production_is_declared():
    """``envs.NAME`` reads and ``envs.child_env(NAME=...)`` writes name declared variables only."""
    unknown = []
    for rel, tree in _production_trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "envs":
                if node.attr.isupper() and node.attr not in envs._VARIABLES:
                    unknown.append(f"{rel}:{node.lineno} envs.{node.attr}")
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("envs.child_env", "envs.set_default"):
                names = [k.arg for k in node.keywords if k.arg and k.arg.isupper()]
                names += [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                unknown += [f"{rel}:{node.lineno} {n}" for n in names if n not in envs._ENV_NAMES]
    assert not unknown, "declare these in pdbus/envs.py: " + ", ".join(unknown)


def test_reads_see_the_environment_now(monkeypatch):
    monkeypatch.setenv("PDBUS_TRANSFER_TIMEOUT_S", "7.5")
    assert envs.PDBUS_TRANSFER_TIMEOUT_S == 7.5
    monkeypatch.setenv("PDBUS_TRANSFER_TIMEOUT_S", "not a number")
    assert envs.PDBUS_TRANSFER_TIMEOUT_S == 30.0
    monkeypatch.setenv("PDBUS_FAULT_STEP_DELAY_MS", "250")
    assert envs.PDBUS_FAULT_STEP_DELAY_S == pytest.approx(0.25)
    monkeypatch.setenv("PDBUS_MOONCAKE_TCP", "yes")
    assert envs.PDBUS_MOONCAKE_TCP is True
    monkeypatch.delenv("PDBUS_TORCH_THREADS", raising=False)
    assert envs.PDBUS_TORCH_THREADS >= 1
    monkeypatch.setenv("PDBUS_TORCH_THREADS", "3")
    assert envs.PDBUS_TORCH_THREADS == 3
    with pytest.raises(AttributeError, match="declare the variable in pdbus/envs.py"):
        envs.PDBUS_NOT_A_VARIABLE  # noqa: B018


def test_child_env_sets_only_declared_variables(monkeypatch):
    monkeypatch.setenv("PDBUS_EP_MASTER", "10.0.0.1:1234")
    monkeypatch.delenv("PDBUS_TORCH_THREADS", raising=False)
    env = envs.child_env(CUDA_VISIBLE_DEVICES="2,3", defaults={"PDBUS_TORCH_THREADS": 1, "PDBUS_EP_MASTER": "x"})
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["PDBUS_EP_MASTER"] == "10.0.0.1:1234"
    assert env["PDBUS_TORCH_THREADS"] == "1"
    assert "PDBUS_EP_MASTER" not in envs.child_env(PDBUS_EP_MASTER=None)
    with pytest.raises(KeyError, match="PDBUS_TYPO is not declared"):
        envs.child_env(PDBUS_TYPO="1")


def test_one_config_error_class():
    """Flags, TOML, a model's config.json and a bus key file all raise the same ConfigError."""
    from native.model import config as model_config
    from pdbus import config, security

    assert model_config.ConfigError is config.ConfigError
    with pytest.raises(config.ConfigError, match="bus key file /nonexistent"):
        security.load_key_file("/nonexistent")
    defined = []
    for rel, tree in _production_trees():
        defined += [f"{rel}:{n.lineno}" for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "ConfigError"]
    assert defined == ["pdbus/config.py:" + defined[0].split(":")[1]], defined
