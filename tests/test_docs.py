"""The user guide's links: every relative link and image in README.md and docs/*.md names a file of the checkout."""

import re

from tests.conftest import REPO

LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_every_relative_link_of_the_guide_names_a_file():
    broken = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address, or a heading of the same page
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, broken
