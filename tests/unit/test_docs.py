"""docs/config.md is generated from the schema and must stay in sync with it."""

from pathlib import Path

from p3d.config.reference import SECTIONS, render
from p3d.config.schema import P3DConfig

ROOT = Path(__file__).resolve().parents[2]


def test_config_reference_is_up_to_date():
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed.strip() == render().strip(), "run: python -m p3d.config.reference > docs/config.md"


def test_every_schema_section_and_key_is_documented():
    import dataclasses

    text = render()
    assert set(SECTIONS) == {field.name for field in dataclasses.fields(P3DConfig)}
    for section, field in ((s, f) for s in SECTIONS for f in dataclasses.fields(type(getattr(P3DConfig(), s)))):
        row = next(line for line in text.splitlines() if line.startswith(f"| `{section}.{field.name}` |"))
        assert not row.rstrip().endswith("|  |"), f"{section}.{field.name} has no one-line doc"


def test_docs_site_builds_strictly(tmp_path):
    """mkdocs --strict fails on broken links and pages missing from the navigation."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "site" / "parallelism" / "index.html").exists()
