"""benchmarks/coverage_census.py's outcomes and the doc block it writes, on made-up lines (no model is built)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def census():
    sys.path.insert(0, str(BENCH))  # the script imports its sibling _common
    try:
        spec = importlib.util.spec_from_file_location("coverage_census", BENCH / "coverage_census.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


def _report(convertible: bool, **extra):
    return SimpleNamespace(convertible=convertible, **extra)


def test_outcome_counts_compensated_ops_only_where_check_reports_them(census):
    assert census.outcome(_report(True)) == "converts"  # today's check: no such attribute
    assert census.compensated_ops(_report(True)) is None
    assert census.outcome(_report(True, compensated=[])) == "converts"
    assert census.outcome(_report(True, compensated=["blocks.0.norm1", "blocks.0.attn"])) == "compensated"
    assert census.compensated_ops(_report(True, compensated=3)) == 3
    assert census.outcome(_report(False, compensated=2)) == "refused"


def test_a_refusal_names_its_cause_before_the_kinds_of_its_ops(census):
    def report(problems=(), activations=3, untraceable=None):
        found = [SimpleNamespace(kind=k) for k in problems]
        return SimpleNamespace(convertible=not found and activations > 0, problems=found, activations=activations,
                               untraceable=untraceable)

    assert census.refusal_kinds(report()) == []
    assert census.refusal_kinds(report(["norm", "gate", "norm"])) == ["gate", "norm"]
    assert census.refusal_kinds(report(["norm"], untraceable="TraceError: x")) == ["untraceable", "norm"]
    assert census.refusal_kinds(report(["gate"], activations=0)) == ["no_activation", "gate"]
    assert census.refusal_kinds(report(untraceable="TraceError: x")) == []  # IF neurons only: converts untraced


def _line(name, status, family="f", kinds=(), compensated=None):
    return {"name": name, "family": family, "status": status, "activations": ["relu"], "kinds": list(kinds),
            "compensated_ops": compensated, "seconds": 1.0, "package_hash": "h", "error": "E: x"}


def _summary(census, lines):
    return {"meta": {"command": "python benchmarks/coverage_census.py --stage report", "date": "d", "git_commit": "c" * 40,
                     "package_changes": [], "timm": "t", "qcfs_snntorch": "q", "python": "p"},
            "timm_names": len(lines), "stage1": {"totals": census.stage1_totals(lines), "families": census.family_rows(lines)}}


def test_doc_block_has_a_compensated_column_once_lines_have_one(census, tmp_path):
    today = [_line("a", "converts"), _line("b", "refused", kinds=["norm", "gate"]), _line("c", "failed")]
    block = census.markdown(_summary(census, today))
    assert "| converts: IF neurons and linear operations only | **1** | 33.3 % |" in block
    assert "| converts with compensated non-linear operations | **–** | – |" in block
    assert "| `norm` | 1 |" in block and "| `gate` | 1 |" in block
    assert "- c: `E: x`" in block
    assert "| family | archs | converts | refused |" in block

    later = [_line("a", "converts", compensated=0), _line("v", "compensated", compensated=4), _line("b", "refused", kinds=["max"])]
    block = census.markdown(_summary(census, later))
    assert "**2 of 3 convert (66.7 %)**: 1 with IF neurons and linear operations only, 1 with compensated operations" in block
    assert "| converts with compensated non-linear operations | **1** | 33.3 % |" in block
    assert "| family | archs | converts | compensated | refused |" in block
    assert "| f | 3 | 1 | 1 | 1 | 0 | max 1 |" in block

    doc = tmp_path / "COVERAGE.md"
    doc.write_text(f"prose\n{census.MARK_START}\nold\n{census.MARK_END}\nmore prose\n")
    census.write_doc(doc, block)
    text = doc.read_text()
    assert text.startswith("prose\n") and text.endswith("more prose\n") and "old" not in text and block in text
    doc.write_text("no markers")
    with pytest.raises(SystemExit, match="coverage_census: start"):
        census.write_doc(doc, block)


def test_stage2_counts_agreement_only_where_it_was_compared(census):
    def line(name, ran, **extra):
        return {"name": name, "family": "f", "params_m": 1.0, "size": 64, "converted": True, "ran": ran,
                "seconds": 1.0, **extra}

    lines = [line("a", True, consistent=True), line("b", True, consistent=False), line("c", True),
             line("d", False, consistent=False, error="E: x", step="forward")]
    summary = census.stage2_summary(lines, {})
    assert (summary["ran"], summary["compared"], summary["consistent"]) == (3, 2, 1)
    report = _summary(census, [_line("a", "converts")])
    report["stage2_all"] = lines
    block = census.markdown(report)
    assert "**1 of the 2 compared agree**" in block
    assert "| f | b | 1.0 | 64 | yes | yes | **no** |" in block and "| f | c | 1.0 | 64 | yes | yes | – |" in block
