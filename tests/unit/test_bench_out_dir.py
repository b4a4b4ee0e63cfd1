"""`make bench` writes to a scratch folder unless --out-dir names the committed one."""

from __future__ import annotations

import subprocess
from pathlib import Path

from benchmarks import sweep

ROOT = Path(sweep.__file__).parent.parent


def test_the_sweep_writes_to_a_scratch_folder_by_default() -> None:
    out_dir = sweep._parser().parse_args([]).out_dir
    assert out_dir == sweep.SCRATCH_DIR
    assert not out_dir.resolve().is_relative_to(sweep.RESULTS_DIR.resolve())
    # Git ignores the scratch folder: a trial sweep leaves the work tree clean.
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(out_dir / "x.json")], cwd=ROOT, check=False
    )
    assert ignored.returncode == 0


def test_out_dir_names_the_committed_results() -> None:
    args = sweep._parser().parse_args(["--out-dir", "benchmarks/results"])
    assert (ROOT / args.out_dir).resolve() == sweep.RESULTS_DIR.resolve()
