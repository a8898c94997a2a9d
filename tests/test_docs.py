"""The documentation builds and its references stay valid.

`mkdocs build --strict` fails on a broken link between pages, a page missing from the
navigation, or a missing anchor; the other tests check what MkDocs does not: that
every `ctmodels.…` name the pages and README mention exists, that README's relative
links point at files, and that README stays a front page.
"""

import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
README = ROOT / "README.md"


def test_mkdocs_builds_strict(tmp_path):
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    config = load_config(str(ROOT / "mkdocs.yml"), site_dir=str(tmp_path / "site"))
    config["strict"] = True
    build(config)
    assert (tmp_path / "site" / "index.html").exists()


def _resolve(dotted: str) -> object:
    """Import the longest importable module prefix, then getattr the rest."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


_NAME = re.compile(r"`(ctmodels(?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def _names():
    found = set()
    for path in [README, *DOCS]:
        for m in _NAME.finditer(path.read_text()):
            found.add((path.name, m.group(1)))
    return sorted(found)


@pytest.mark.parametrize("page,name", _names(), ids=lambda x: str(x))
def test_code_reference_exists(page, name):
    try:
        _resolve(name)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"{page} mentions `{name}`, which does not exist ({e})")


def test_readme_links_point_at_files():
    text = README.read_text()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (ROOT / target).exists(), f"README links to missing {target}"


def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 120, f"README has {len(lines)} lines; move detail to docs/"
