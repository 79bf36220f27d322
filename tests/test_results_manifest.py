"""results/: what the documents cite is there, and what is there is cited and listed (CPU only).

A citation is any path that starts with ``results/`` in the documents (README.md, BENCHMARKS.md,
docs/), the notebooks (sources and outputs), the tests and the code: markdown links (also ``../``
from docs/), backticks, bare paths in prose or commands, JSON strings. results/README.md lists every
file under results/ in the first column of its tables; it does not count as a citation.
"""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"
MANIFEST = RESULTS / "README.md"

# "results/" not preceded by a name character (so "my_results/" is not one), then path characters;
# it stops at whitespace, quotes, backticks, brackets, commas, backslashes (JSON's "\n").
CITATION = re.compile(r"(?<![\w-])results/([\w./-]*)")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _sources():
    """The files whose text may cite results (not results/ itself, not this test)."""
    found = [REPO / "README.md", REPO / "BENCHMARKS.md"]
    found += sorted((REPO / "docs").rglob("*.md"))
    found += sorted((REPO / "notebooks").glob("*.ipynb")) + sorted((REPO / "notebooks").glob("*.py"))
    found += sorted((REPO / "tests").rglob("*.py"))
    found += sorted((REPO / "quickcupy").rglob("*.py")) + sorted((REPO / "quickcupy").rglob("*.json"))
    found += sorted(p for p in (REPO / "cuda").iterdir() if p.is_file())
    found += sorted(p for p in (REPO / ".ci").iterdir() if p.is_file()) if (REPO / ".ci").is_dir() else []
    here = Path(__file__).resolve()
    return [p for p in found if p.is_file() and p.resolve() != here]


def _citations():
    """{path relative to results/ (no trailing '/' or '.'): [source files citing it]}."""
    cited = {}
    for source in _sources():
        for match in CITATION.finditer(source.read_text(encoding="utf-8", errors="replace")):
            rel = match.group(1).rstrip("./")
            cited.setdefault(rel, []).append(str(source.relative_to(REPO)))
    return cited


def _present():
    """Every file under results/ (relative to it), the manifest itself excepted."""
    return sorted(str(p.relative_to(RESULTS)) for p in RESULTS.rglob("*")
                  if p.is_file() and p != MANIFEST)


def _listed():
    """The files results/README.md lists: backticked paths in the first cell of its table rows."""
    listed = []
    for line in MANIFEST.read_text().splitlines():
        cells = line.split("|")
        if line.startswith("|") and len(cells) > 2:
            listed += re.findall(r"`([^`]+)`", cells[1])
    return listed


def _exists(rel):
    """A file or folder under results/, or an output prefix: `--out results/h100/ncu` names ncu.*."""
    path = RESULTS / rel
    return path.exists() or (bool(path.name) and any(path.parent.glob(path.name + ".*")))


def test_citation_forms():
    text = ("[a](results/h100/a.txt) and [b](../results/h100/b.json), `results/h100/c.csv`, bare "
            "results/h100/d.log. \"--json results/h100/e.json\\n\", not my_results/f.txt")
    assert [m.group(1).rstrip("./") for m in CITATION.finditer(text)] == [
        "h100/a.txt", "h100/b.json", "h100/c.csv", "h100/d.log", "h100/e.json"]


def test_every_cited_result_exists():
    missing = {rel: where for rel, where in _citations().items() if not _exists(rel)}
    assert not missing, f"cited under results/ but missing (path: citing files): {missing}"


def test_every_result_is_cited():
    cited = _citations()
    uncited = [rel for rel in _present() if rel not in cited]
    assert not uncited, f"files under results/ that no document, notebook, test or code cites: {uncited}"


def test_manifest_lists_exactly_the_results():
    listed = _listed()
    assert len(listed) == len(set(listed)), f"listed twice in results/README.md: " \
        f"{sorted({f for f in listed if listed.count(f) > 1})}"
    present = set(_present())
    assert not present - set(listed), f"not listed in results/README.md: {sorted(present - set(listed))}"
    assert not set(listed) - present, f"listed in results/README.md but missing: {sorted(set(listed) - present)}"


def test_markdown_links_into_results_resolve():
    """A relative link to a result resolves from the document's own folder (docs/ links need ../)."""
    broken = []
    for doc in [p for p in _sources() if p.suffix == ".md"] + [MANIFEST]:
        for target in MD_LINK.findall(doc.read_text()):
            target = target.split("#")[0]
            relevant = "results/" in target or (doc == MANIFEST and not re.match(r"\w+:", target))
            if relevant and target and not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(REPO)}: {target}")
    assert not broken, f"links that do not resolve: {broken}"
