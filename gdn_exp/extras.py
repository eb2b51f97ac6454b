"""Optional dependencies, installed by pyproject's extras: `have(module)` says whether one is importable,
`missing(module, purpose)` is the one line that tells the user how to get it."""
import importlib.util

EXTRA = {"matplotlib": "plots", "pandas": "analyze", "transformers": "hf", "safetensors": "hf", "fla": "bench"}


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def missing(module: str, purpose: str) -> str:
    return f"{purpose} needs {module}, which is not installed: pip install 'gdn-exp[{EXTRA[module]}]'"
