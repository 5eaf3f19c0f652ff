"""GPU export parity helper for ``export_parity.sh``: makes ``priorclip.export`` importable from this checkout even
when the project is not pip-installed on the GPU machine, then runs ``priorclip.export.report``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _ensure_import() -> None:
    sys.path.insert(0, str(ROOT))
    try:
        import priorclip.export  # noqa: F401

        return
    except ImportError:
        pass
    # The package-dir mapping (pyproject) is not installed: map priorclip.export onto ./export by hand.
    import priorclip

    spec = importlib.util.spec_from_file_location("priorclip.export", ROOT / "export" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "export")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["priorclip.export"] = mod
    priorclip.export = mod
    spec.loader.exec_module(mod)


if __name__ == "__main__":
    _ensure_import()
    from priorclip.export.report import main

    main(prog_name="export_parity")
