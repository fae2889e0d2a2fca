"""``report.html``: one self-contained page (PNGs as base64 ``data:`` URIs, inline CSS, no scripts),
so it opens offline, from an MLflow artifact view or as an e-mail attachment."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import pandas as pd

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figcaption { font-size: 0.85em; max-width: 800px; color: #444; }
.missing { color: #a33; } .narrative li { margin: 0.3em 0; }
"""


def data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def mean_std(table: pd.DataFrame, columns: list[str], digits: int = 4) -> pd.DataFrame:
    """Display copy of ``table``: each of ``columns`` as "mean ± std" where a std over seeds exists."""
    out = table.copy()
    for col in columns:
        std = table.get(f"{col}_std", pd.Series(math.nan, index=table.index))
        out[col] = [
            f"{m:.{digits}f}" + ("" if pd.isna(s) else f" ± {s:.{digits}f}") for m, s in zip(table[col], std)
        ]
    return out


def with_interval(table: pd.DataFrame, columns: list[str], digits: int = 4) -> pd.DataFrame:
    """Display copy: each of ``columns`` as "estimate [low, high]" where ``<col>_low`` / ``_high`` exist;
    the bound columns are dropped."""
    out = table.copy()
    for col in columns:
        if col not in table:
            continue
        lo, hi = (table.get(f"{col}_{b}", pd.Series(math.nan, index=table.index)) for b in ("low", "high"))
        out[col] = [
            ""
            if pd.isna(v)
            else f"{v:+.{digits}f}" + ("" if pd.isna(a) else f" [{a:+.{digits}f}, {b:+.{digits}f}]")
            for v, a, b in zip(table[col], lo, hi)
        ]
        out = out.drop(columns=[c for c in (f"{col}_low", f"{col}_high") if c in out])
    return out


def _figure(name: str, image: Path | str, caption: str) -> str:
    if isinstance(image, Path):
        return (
            f'<figure><img src="{data_uri(image)}" alt="{html.escape(name)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    return f'<p class="missing">{html.escape(name)}: not drawn ({html.escape(image)}).</p>'


def render(
    title: str,
    narrative: list[str],
    figures: list[tuple[str, Path | str, str]],
    tables: list[tuple[str, pd.DataFrame]],
    missing: list[str],
) -> str:
    """The page: narrative, what is missing or was left out, figures (name, PNG or the reason it is
    absent, caption), tables (caption, frame)."""
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
        "<h2>Findings</h2><ul class='narrative'>",
        *(f"<li>{html.escape(line)}</li>" for line in narrative),
        "</ul>",
    ]
    if missing:
        parts += [
            "<h2>Missing or left out</h2><ul class='missing'>",
            *(f"<li>{html.escape(m)}</li>" for m in missing),
            "</ul>",
        ]
    parts += ["<h2>Figures</h2>", *(_figure(*fig) for fig in figures)]
    for caption, table in tables:
        parts += [
            f"<h2>{html.escape(caption)}</h2>",
            table.to_html(index=False, na_rep="–", float_format=lambda v: f"{v:.4g}", border=0),
        ]
    parts.append("</body></html>")
    return "\n".join(parts)
