"""benchmarks/gpu_acceptance.py, the GPU acceptance run: its CPU dry run goes through every section with passing
checks (so the GPU run cannot rot unnoticed), and on a CUDA machine the run itself passes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_acceptance.py"
SECTIONS = {"(a)", "(b)", "(c)", "(d)", "(e)", "(f)"}
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


class Row(NamedTuple):
    section: str
    check: str
    result: str
    status: str


def table_rows(markdown: str) -> list[Row]:
    """The table's rows (header and rule left out); cells split on the pipes that are not escaped."""
    lines = [line for line in markdown.splitlines() if line.startswith("| (")]
    return [Row(*(cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1])) for line in lines]


def numbers(text: str) -> list[float]:
    return [float(x) for x in NUMBER.findall(text)]


def run_acceptance(tmp_path: Path, *args: str, timeout_s: int) -> list[Row]:
    out = tmp_path / "table.md"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=timeout_s,
    )  # fmt: skip
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    rows = table_rows(out.read_text())
    assert {r.section[:3] for r in rows} == SECTIONS, "every section (a)-(f) has a row"
    assert not [r for r in rows if r.status == "fail"]
    return rows


def check_parity_and_layouts(rows: list[Row]) -> None:
    """(a) fp32 within 1e-4 relative; (b) sdpa within 1e-3 on the log-probs and 1e-4 of the largest gradient."""
    (fp32,) = [r for r in rows if r.section.startswith("(a)") and r.check.startswith("fp32")]
    assert numbers(fp32.result)[0] <= 1e-4, fp32
    (logps,) = [r for r in rows if r.section.startswith("(b)") and r.check.startswith("sdpa fp32: chosen")]
    assert numbers(logps.result)[0] <= 1e-3, logps
    (grads,) = [r for r in rows if r.section.startswith("(b)") and r.check.startswith("sdpa fp32: gradients")]
    diff, largest = numbers(grads.result)[:2]
    assert diff <= 1e-4 * largest, grads


@pytest.mark.slow
def test_cpu_dry_run_covers_every_section_within_tolerance(tmp_path):
    rows = run_acceptance(tmp_path, "--cpu-dry-run", timeout_s=300)
    check_parity_and_layouts(rows)
    (skipped,) = [r for r in rows if r.status == "skipped"]  # only what needs CUDA
    assert skipped.section.startswith("(b)") and "no CUDA" in skipped.result


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_acceptance_run(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    rows = run_acceptance(tmp_path, timeout_s=900)
    check_parity_and_layouts(rows)
    (bf16,) = [r for r in rows if r.section.startswith("(a)") and r.check.startswith("bf16")]
    assert numbers(bf16.result)[0] <= 5e-2, bf16
