"""Execute the tutorial notebooks (and the plot gallery) top to bottom; fail on the first error.

Usage (from the repository root, in an environment with ``pip install -e ".[test,tutorials]"``)::

    python docs/tutorials/run.py                       # every notebook, outputs discarded (a check)
    python docs/tutorials/run.py --inplace             # re-execute and save the outputs into the notebooks
    python docs/tutorials/run.py docs/tutorials/01_quickstart.ipynb --inplace

Each notebook runs in its own folder (as Jupyter does), so relative paths such as ``../../../shared/data`` resolve
from ``docs/tutorials/``. Without ``--inplace`` nothing in the checkout is rewritten: the executed copy is written
into a temporary folder (or ``--output-dir``) and removed. ``nox -s tutorials`` runs this script.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent
MAX_BYTES = 1_500_000  # a committed notebook stays below 1.5 MB


def default_notebooks() -> list[Path]:
    """Every tutorial in ``docs/tutorials`` (in name order), then ``docs/gallery.ipynb``."""
    notebooks = sorted(HERE.glob("*.ipynb"))
    gallery = DOCS / "gallery.ipynb"
    if gallery.is_file():
        notebooks.append(gallery)
    return notebooks


def _tidy(nb: object) -> None:
    """Drop per-run noise (execution timestamps) so that re-executed notebooks diff only where outputs changed."""
    for cell in nb.cells:  # type: ignore[attr-defined]
        cell.metadata.pop("execution", None)


def execute(path: Path, *, inplace: bool, output_dir: Path | None, timeout: int, kernel_name: str) -> float:
    """Execute one notebook in its own folder; return the wall time in seconds (raises on any cell error)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=kernel_name,
        allow_errors=False,
        record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    _tidy(nb)
    if inplace:
        nbformat.write(nb, path)
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise RuntimeError(f"{path} is {size / 1e6:.2f} MB after execution; keep it below {MAX_BYTES / 1e6} MB.")
    elif output_dir is not None:
        nbformat.write(nb, output_dir / path.name)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to run (default: all tutorials + gallery)")
    parser.add_argument("--inplace", action="store_true", help="save the executed notebooks over the originals")
    parser.add_argument("--output-dir", type=Path, help="write executed copies here instead of a temporary folder")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per cell (default: 1200)")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel name (default: python3)")
    args = parser.parse_args(argv)

    notebooks = [p.resolve() for p in args.notebooks] or default_notebooks()
    missing = [str(p) for p in notebooks if not p.is_file()]
    if missing:
        parser.error(f"notebooks not found: {missing}")
    with tempfile.TemporaryDirectory(prefix="histoflow-tutorials-") as tmp:
        out = None if args.inplace else (args.output_dir or Path(tmp))
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        for path in notebooks:
            print(f"executing {path.relative_to(DOCS.parent) if path.is_relative_to(DOCS.parent) else path} ...")
            sys.stdout.flush()
            elapsed = execute(path, inplace=args.inplace, output_dir=out, timeout=args.timeout, kernel_name=args.kernel)
            print(f"  ok in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
