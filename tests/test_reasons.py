"""One closed list of failure reasons: the code names every reason from `Reason`, and the schemas publish it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from markerless.errors import MarkerlessError, Reason
from markerless.service.messages import PoseResult, RegistrationStatus, json_schemas

SRC = Path(__file__).resolve().parents[1] / "src" / "markerless"
# Calls whose argument in this position (or keyword `reason`) is a failure reason.
REASON_ARGUMENT = {"LocalizationResult": 1, "failure": 1, "reply_failure": 1, "refuse": 2, "status_error": 1}


def _trees() -> list[tuple[Path, ast.AST]]:
    return [(path, ast.parse(path.read_text(), str(path))) for path in sorted(SRC.rglob("*.py"))]


def _literal_reasons(tree: ast.AST) -> list[str]:
    """String constants given where a reason goes: `reason=...`, `reason = ...`, or a reason argument."""
    found = []
    for node in ast.walk(tree):
        values: list[ast.expr] = []
        if isinstance(node, ast.Call):
            values += [k.value for k in node.keywords if k.arg == "reason"]
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            position = REASON_ARGUMENT.get(name or "")
            if position is not None and len(node.args) > position:
                values.append(node.args[position])
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(getattr(t, "id", getattr(t, "attr", None)) == "reason" for t in targets) and node.value:
                values.append(node.value)
        found += [ast.unparse(v) for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    return found


def _named_reasons(tree: ast.AST) -> set[str]:
    """Members named as `Reason.X` (the enum's own body defines them by assignment, not by attribute)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "Reason":
            names.add(node.attr)
    return names


def test_no_reason_is_a_string_literal() -> None:
    found = {str(path.relative_to(SRC)): lits for path, tree in _trees() if (lits := _literal_reasons(tree))}
    assert found == {}


def test_the_code_names_exactly_the_listed_reasons() -> None:
    """Every `Reason.X` the code names exists, and every listed reason is emitted somewhere (no dead entries)."""
    named = set().union(*(_named_reasons(tree) for _, tree in _trees()))
    assert named == set(Reason.__members__)


def test_the_checks_see_literals() -> None:
    tree = ast.parse('LocalizationResult(False, "nope", "m")\nraise E("m", reason="late")\nclass X:\n  reason = "r"')
    assert sorted(_literal_reasons(tree)) == ["'late'", "'nope'", "'r'"]


@pytest.mark.parametrize("model", [PoseResult, RegistrationStatus])
def test_schemas_publish_the_list(model: type) -> None:
    schema = json_schemas()[model.__name__]
    assert schema["properties"]["reason"]["anyOf"][0] == {"$ref": "#/$defs/Reason"}
    assert schema["$defs"]["Reason"]["enum"] == [r.value for r in Reason]


def test_an_unlisted_reason_is_refused_on_the_wire() -> None:
    with pytest.raises(ValueError):
        PoseResult.failure("cam", "made_up", "m")  # type: ignore[arg-type]
    assert PoseResult.failure("cam", Reason.PNP_FAILED, "m").model_dump(mode="json")["reason"] == "pnp_failed"
    assert MarkerlessError("m").reason is Reason.INTERNAL_ERROR
