"""Markdown tables for the report, the benchmarks and the long-context evaluation (no dependencies, so
gdn-bench can use it on a GPU machine without Hydra)."""


def markdown_table(columns: list, rows: list) -> str:
    """A markdown table: a header of `columns`, then one line per row of already formatted cells."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
