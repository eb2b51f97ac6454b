"""gdn-exp: an experiment runner for Gated DeltaNet research."""
import importlib.util
from pathlib import Path


def _check_tasks_package() -> None:
    """gdn-exp installs the top-level package `tasks` beside `gdn_exp`. A user's own `tasks` found first on sys.path
    (a tasks/ in the working directory, say) would silently replace it: stop with one line naming both instead."""
    spec = importlib.util.find_spec("tasks")
    ours = Path(__file__).resolve().parent.parent / "tasks"
    found = Path(spec.origin).resolve().parent if spec is not None and spec.origin else None
    if found != ours:
        raise ImportError(f"the package `tasks` at {found or 'a namespace package'} shadows gdn-exp's ({ours}); "
                          f"run from another directory or rename yours")


_check_tasks_package()
