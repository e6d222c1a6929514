"""The stack guard: the tested transformers range is enforced at apply time, and the environment is the lock."""
from pathlib import Path

import pytest
import transformers

import visiondrop
from visiondrop import stack

LOCK = Path(__file__).parents[1] / "requirements.lock"


def test_tested_range_is_the_declared_one():
    declared = stack.tested_transformers().specifier
    assert transformers.__version__ in declared
    assert "5.23.0" in declared and "5.24.0" in declared  # both releases the suite passed on
    assert "5.22.2" not in declared and "5.25.0" not in declared and "6.0.0" not in declared


def test_apply_refuses_an_untested_transformers(tiny, monkeypatch):
    model, _ = tiny
    monkeypatch.delenv(stack.ALLOW_UNTESTED, raising=False)
    monkeypatch.setattr(stack, "installed_transformers", lambda: "5.30.0")
    with pytest.raises(stack.UntestedStackError) as error:
        visiondrop.apply(model, "visiondrop", budget=64)
    message = str(error.value)
    assert "transformers 5.30.0 is installed" in message and "<5.25" in message and stack.ALLOW_UNTESTED in message
    assert getattr(model.model, "_visiondrop_pruner", None) is None  # nothing was installed
    monkeypatch.setenv(stack.ALLOW_UNTESTED, "1")
    visiondrop.apply(model, "visiondrop", budget=64).remove()


def test_environment_is_exactly_the_lock():
    assert stack.check(str(LOCK)) == []


def test_check_names_every_difference(tmp_path):
    pins = stack.installed()  # the environment itself, then three differences
    pins["filelock"] = "4.3.1"
    del pins["pandas"]
    pins["not-installed-anywhere"] = "1.0"
    lock = tmp_path / "lock.txt"
    lock.write_text("".join(f"{name}=={version}\n" for name, version in pins.items()))
    problems = stack.check(str(lock))
    assert sorted(problems) == sorted([
        f"filelock: locked 4.3.1, installed {stack.installed()['filelock']}",
        "not-installed-anywhere: locked 1.0, installed nothing",
        f"pandas {stack.installed()['pandas']}: installed but not in the lock",
    ])
