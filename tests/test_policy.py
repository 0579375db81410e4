"""Policy as code: the example is valid; broken policies name the field and what is wrong."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from intake.core.errors import PolicyError
from intake.core.policy import load_policy, parse_duration, parse_policy
from intake.runtime import EXAMPLE_POLICY


def example() -> dict[str, Any]:
    return tomllib.loads(EXAMPLE_POLICY.read_text())


def test_example_policy_is_valid_and_says_what_issue_requires() -> None:
    policy = load_policy(EXAMPLE_POLICY)
    web, payments = policy.find_repo("acme/web"), policy.find_repo("acme/payments")
    assert web and payments
    assert policy.risk_tiers[web.tier].approvals == 1
    assert policy.risk_tiers[web.tier].groups == ("platform",)
    assert set(web.change_types) == {"docs", "tests", "bugfix", "dependency-bump"}
    tier = policy.risk_tiers[payments.tier]
    assert tier.approvals == 2 and tier.require == {"security": 1}
    assert "payments/keys/**" in payments.blocked_paths
    assert policy.groups_of("carol") == ("security",)


def test_version_hash_ignores_comments_but_not_content(tmp_path: Path) -> None:
    text = EXAMPLE_POLICY.read_text()
    a, b, c = tmp_path / "a.toml", tmp_path / "b.toml", tmp_path / "c.toml"
    a.write_text(text)
    b.write_text("# a comment\n" + text)
    c.write_text(text.replace('idea_ttl = "72h"', 'idea_ttl = "48h"'))
    assert load_policy(a).version_hash == load_policy(b).version_hash
    assert load_policy(a).version_hash != load_policy(c).version_hash


def _broken(mutate: Any) -> dict[str, Any]:
    data = example()
    mutate(data)
    return data


BROKEN = [
    ("unknown tier", lambda d: d["repos"][1].update(tier="gold"), "repos[1].tier", "unknown risk tier 'gold'"),
    ("wrong type", lambda d: d["risk_tiers"]["standard"].update(approvals="two"),
     "risk_tiers.standard.approvals", "valid integer"),
    ("missing field", lambda d: d["clocks"].pop("run_timeout"), "clocks.run_timeout", "Field required"),
    ("bad duration", lambda d: d["clocks"].update(idea_ttl="5 parsecs"), "clocks.idea_ttl", "duration"),
    ("unknown key", lambda d: d.update(approvers_channel="C1"), "approvers_channel", "Extra inputs"),
    ("duplicate repo", lambda d: d["repos"].append(dict(d["repos"][0])), "repos[2].name", "duplicate repo"),
    ("unknown change type", lambda d: d["repos"][0]["change_types"].append("rewrite"),
     "repos[0].change_types[4]", "unknown change type 'rewrite'"),
    ("too few members", lambda d: d["groups"]["security"].update(members=["carol"]) or
     d["risk_tiers"]["privileged"].update(groups=["security"]), "risk_tiers.privileged.approvals",
     "needs 2 distinct approvers but its groups have 1"),
    ("escaping glob", lambda d: d["repos"][0].update(blocked_paths=["../secrets/**"]),
     "repos[0].blocked_paths[0]", "without '..'"),
    ("change type without paths", lambda d: d["change_types"]["docs"].pop("paths"),
     "change_types.docs.paths", "Field required"),
    ("change type with no paths", lambda d: d["change_types"]["docs"].update(paths=[]),
     "change_types.docs.paths", "at least 1"),
    ("bad change-type glob", lambda d: d["change_types"]["tests"].update(paths=["tests//x"]),
     "change_types.tests.paths[0]", "invalid path pattern"),
    ("escaping change-type glob", lambda d: d["change_types"]["docs"].update(paths=["../**"]),
     "change_types.docs.paths[0]", "without '..'"),
    ("require outside groups", lambda d: d["risk_tiers"]["standard"].update(require={"security": 1}),
     "risk_tiers.standard.require.security", "not one of the tier's groups"),
]


@pytest.mark.parametrize(("kind", "mutate", "field", "message"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_policy_names_field(kind: str, mutate: Any, field: str, message: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy(_broken(mutate))
    assert err.value.field == field
    assert message in str(err.value)


def test_toml_syntax_error(tmp_path: Path) -> None:
    bad = tmp_path / "p.toml"
    bad.write_text('version = "x"\n[clocks\n')
    with pytest.raises(PolicyError, match="TOML syntax error"):
        load_policy(bad)


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("30m", 1800), ("72h", 259200), ("2d", 172800), (45, 45)])
def test_durations(text: Any, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0s", "-5m", "5 parsecs", "1.5h", True, ""])
def test_bad_durations(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_result_approvals_and_privileged_paths() -> None:
    policy = parse_policy(example())
    privileged = policy.risk_tiers["privileged"]
    assert privileged.result_rule(False) is not None and privileged.result_rule(False).groups == ("security",)
    standard = policy.risk_tiers["standard"]
    assert standard.result_rule(False) is None and standard.result_rule(True).groups == ("platform",)
    web = policy.find_repo("acme/web")
    assert web is not None and web.touches_privileged(["Auth/login.py"]) and not web.touches_privileged(["docs/a.md"])
    data = example()
    data["risk_tiers"]["privileged"]["result_approvals"] = {"approvals": 1, "groups": ["nobody"]}
    with pytest.raises(PolicyError, match=r"risk_tiers\.privileged\.result_approvals\.groups\[0\]: unknown group"):
        parse_policy(data)
    data = example()
    data["repos"][0]["privileged_paths"] = ["../x"]
    with pytest.raises(PolicyError, match=r"privileged_paths"):
        parse_policy(data)


# -- [dependencies] -------------------------------------------------------------------------


def test_example_dependency_policy() -> None:
    deps = load_policy(EXAMPLE_POLICY).dependencies
    assert [a.package for a in deps.allow] == ["pypi:pytest", "pypi:ruff", "pypi:mypy"]
    assert [d.package for d in deps.deny] == ["npm:axios@1.14.1", "npm:axios@0.30.4"]
    assert "GPL-3.0-only" in deps.licenses.denied and deps.licenses.unknown == "block"


def test_dependency_entries_are_normalised_per_ecosystem() -> None:
    data = example()
    data["dependencies"] = {"allow": ["pypi:Flask_Login", "cargo:Serde_JSON", "npm:@types/node",
                                      {"package": "go:github.com/google/uuid", "version": ">=1.6,<2"}],
                            "deny": ["npm:@evil/pkg@1.0.0"]}
    deps = parse_policy(data).dependencies
    assert [a.package for a in deps.allow] == ["pypi:flask-login", "cargo:serde-json", "npm:@types/node",
                                               "go:github.com/google/uuid"]
    assert deps.deny[0].package == "npm:@evil/pkg@1.0.0"


BROKEN_DEPENDENCIES = [
    ({"allow": ["mypy"]}, "dependencies.allow[0].package", "must start with an ecosystem"),
    ({"allow": ["rubygems:rails"]}, "dependencies.allow[0].package", "must start with an ecosystem"),
    ({"allow": ["npm:Not Valid"]}, "dependencies.allow[0].package", "not a valid npm package name"),
    ({"allow": [{"package": "pypi:x", "version": "=>1"}]}, "dependencies.allow[0]", "not a valid pypi version specifier"),
    ({"allow": [{"package": "npm:x", "version": "~>1"}]}, "dependencies.allow[0]", "not a valid npm version specifier"),
    ({"allow": [{"package": "pypi:x", "license": "Nonsense-1.0"}]}, "dependencies.allow[0].license", "Unknown license key"),
    ({"allow": [{"package": "pypi:x", "colour": "red"}]}, "dependencies.allow[0].colour", "Extra inputs"),
    ({"deny": ["npm:axios@latest"]}, "dependencies.deny[0].package", "not a valid npm version"),
    ({"licenses": {"denied": ["MIT OR GPL-3.0-only"]}}, "dependencies.licenses.denied[0]", "one SPDX license id"),
    ({"licenses": {"unknown": "maybe"}}, "dependencies.licenses.unknown", "'allow' or 'block'"),
    ({"require_integrity": "yes please"}, "dependencies.require_integrity", "valid boolean"),
]


@pytest.mark.parametrize(("section", "field", "message"), BROKEN_DEPENDENCIES)
def test_broken_dependency_policy_names_the_field(section: dict[str, Any], field: str, message: str) -> None:
    data = example()
    data["dependencies"] = section
    with pytest.raises(PolicyError) as err:
        parse_policy(data)
    assert err.value.field == field
    assert message in str(err.value)


def test_every_error_gets_its_own_line() -> None:
    data = example()
    data["dependencies"] = {"allow": ["mypy", "pypi:ok", "npm:Bad Name"], "deny": ["axios"]}
    with pytest.raises(PolicyError) as err:
        parse_policy(data)
    lines = str(err.value).splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "dependencies.allow[0].package", "dependencies.allow[2].package", "dependencies.deny[0].package",
    ]
