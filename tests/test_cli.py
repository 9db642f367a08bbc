"""The command line's own texts: --version, docs, and the help of every subcommand."""

import re
import subprocess

import pytest

from conftest import ROOT, plugin_command

COMMANDS = ["serve", "dump", "check", "guard", "purge", "health", "docs"]


def run(*args):
    return subprocess.run(plugin_command() + list(args), capture_output=True, text=True,
                          timeout=60)


def test_version_names_the_package_and_its_version():
    declared = re.search(r'(?m)^version = "([^"]+)"',
                         (ROOT / "pyproject.toml").read_text()).group(1)
    out = run("--version")
    assert out.returncode == 0 and out.stdout == f"kong-oauth2-introspection {declared}\n"


def test_docs_prints_both_plugins_option_tables():
    from kong_oauth2_introspection.schema import load
    out = run("docs")
    assert out.returncode == 0, out.stderr
    for name in ("oauth2-introspection", "oauth2-client-credentials"):
        assert f"### {name}\n\n{load(name).markdown_table()}" in out.stdout
    only = run("docs", "--plugin", "oauth2-client-credentials")
    assert only.stdout == load("oauth2-client-credentials").markdown_table()
    assert run("docs", "--plugin", "key-auth").returncode == 2


@pytest.mark.parametrize("command", COMMANDS)
def test_help_points_only_at_readme_headings_that_exist(command):
    headings = set(re.findall(r"(?m)^#+\s+(.+?)\s*$", (ROOT / "README.md").read_text()))
    out = run(command, "--help")
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # argparse wraps lines
    for pointed in re.findall(r"README's '([^']+)'", text):
        assert pointed in headings, f"{command} --help points at a missing heading {pointed!r}"
