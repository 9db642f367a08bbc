"""The user's documents hold together: every link in the README, docs/, SECURITY.md
and docker/README.md points at a file that exists and, with a #fragment, at a
heading that exists (as GitHub names headings), and the README keeps the
headings that the command's help texts and other pages point at."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "SECURITY.md", ROOT / "CHANGELOG.md",
         ROOT / "docker" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Inline links [text](target); code spans are removed first, so that a `[]` or
# `(...)` inside them is not taken for a link.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)


def slugs(page: Path):
    """GitHub's anchors for a page's headings: lower case, punctuation dropped,
    spaces to dashes, a -N suffix for repeats."""
    seen, found = {}, set()
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    for heading in re.findall(r"(?m)^#{1,6}\s+(.+?)\s*#*\s*$", text):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else "%s-%d" % (slug, n))
    return found


def links(page: Path):
    text = CODE.sub("", page.read_text(encoding="utf-8"))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_reaches_a_file_and_a_heading(page):
    broken = []
    for target in links(page):
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif fragment and (dest.suffix != ".md" or fragment not in slugs(dest)):
            broken.append(target)
    assert broken == []


def test_the_readme_keeps_the_headings_others_point_at():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    sections = re.findall(r"(?m)^## (.+)$", readme)
    for heading in ("Quick start", "Installing", "Enabling it in Kong",
                    "The fail-closed guard", "Options", "What clients see", "Operations",
                    "Troubleshooting", "Upgrading", "Development"):
        assert heading in sections, heading
    # The first two commands a reader meets: run the plugin server, run the tests.
    commands = re.findall(r"```sh\n(.*?)```", readme, re.S)
    assert "kong-oauth2-introspection serve" in commands[0]
    assert commands[1].strip() == "bash tests/run.sh"


def test_the_readme_links_the_developer_index():
    assert "(docs/README.md)" in (ROOT / "README.md").read_text(encoding="utf-8")
    index = links(ROOT / "docs" / "README.md")
    for page in sorted((ROOT / "docs").glob("*.md")):
        if page.name != "README.md":
            assert page.name in index, "%s is not in docs/README.md" % page.name
