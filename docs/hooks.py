"""mkdocs hook: the reference pages are generated from the code at build time, so they cannot go stale.

A page asks for a generated block with an HTML comment on a line of its own:

- `<!-- kvrank:cli -->`       every `kvrank` command and option, from the typer app (`kvrank.cli:app`)
- `<!-- kvrank:settings -->`  the server settings table, from `kvrank.api.settings.settings_table()`
- `<!-- kvrank:python -->`    mkdocstrings directives for the public Python API

Anything that fails here fails the build (`mkdocs build --strict`); a marker is never left in the output.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^<!-- kvrank:(\w+) -->$", re.MULTILINE)


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    return MARKER.sub(lambda m: _generate(m.group(1), page.file.src_uri), markdown)


def _generate(name: str, where: str) -> str:
    if name == "cli":
        return cli_reference()
    if name == "settings":
        from kvrank.api.settings import settings_table

        return settings_table()
    if name == "python":
        return python_reference()
    raise ValueError(f"{where}: unknown generated block <!-- kvrank:{name} -->; use cli, settings or python")


# ------------------------------------------------------------------------------------------------ the CLI
def cli_reference() -> str:
    """One section per command (groups expanded), each with its usage, help and a table of its options."""
    import typer

    from kvrank.cli import app

    root = typer.main.get_command(app)
    ctx = _context(root, "kvrank", None)
    out = [_plain(root.help or ""), "", "Options of every command: "
           + ", ".join(f"`{' / '.join(p.opts)}` ({_plain(p.help or '')})" for p in root.params
                       if p.name != "help" and not getattr(p, "hidden", False)), ""]
    for name in root.list_commands(ctx):
        _command(root.get_command(ctx, name), name, ctx, out)
    return "\n".join(out)


def _context(command: Any, name: str, parent: Any) -> Any:
    return command.context_class(command, info_name=name, parent=parent)


def _command(command: Any, name: str, parent: Any, out: list[str]) -> None:
    if command is None or getattr(command, "hidden", False):
        return
    ctx = _context(command, name, parent)
    path = ctx.command_path
    subcommands = command.list_commands(ctx) if hasattr(command, "list_commands") else []
    out.append(f"## `{path}`\n")
    out.append(_plain(command.help or "") + "\n")
    out.append("```\n" + " ".join(command.collect_usage_pieces(ctx)).join([f"{path} ", ""]) + "\n```\n")
    rows = []
    for param in command.params:
        if getattr(param, "hidden", False) or param.name == "help":
            continue
        rows.append(_param_row(param, ctx))
    if rows:
        out.append("| option | type | default | meaning |\n|---|---|---|---|")
        out.extend(rows)
        out.append("")
    for sub in subcommands:
        _command(command.get_command(ctx, sub), sub, ctx, out)


def _param_row(param: Any, ctx: Any) -> str:
    is_argument = type(param).__name__.endswith("Argument")
    names = (param.name or "").upper() if is_argument else ", ".join([*param.opts, *param.secondary_opts])
    kind = _display_type(param, ctx)
    default = param.default
    if getattr(param, "required", False):
        shown = "required"
    elif default is None or default == () or (getattr(param, "is_flag", False) and default is False):
        shown = ""
    else:
        shown = f"`{default}`"
    meaning = _plain(getattr(param, "help", None) or "")
    if getattr(param, "envvar", None):
        meaning += f" Environment: `{param.envvar}`."
    return f"| `{names}` | {kind} | {shown} | {_cell(meaning)} |"


def _display_type(param: Any, ctx: Any) -> str:
    shown = param.display_type(ctx) if callable(getattr(param, "display_type", None)) else ""
    return str(shown).strip("<>") or "text"


def _plain(text: str) -> str:
    """Help text as Markdown: one line, rich markup unescaped, HTML-significant characters escaped."""
    text = " ".join(text.replace("\b", "").split()).replace("\\[", "[")
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


# --------------------------------------------------------------------------------------------- the Python API
def python_reference() -> str:
    """`kvrank.Reranker`, `kvrank.Searcher` and `kvrank.Hit` (kvrank/library.py), the integrations, and the
    composition root `kvrank.pipeline` underneath."""
    blocks = [f"::: kvrank.library.{name}" for name in ("Reranker", "Searcher", "Hit")]
    blocks += [f"::: kvrank.integrations.{module}" for module in ("langchain", "llama_index")]
    blocks.append("## The pipeline underneath\n\n::: kvrank.pipeline\n    options:\n      members:\n"
                  "        - PipelineConfig\n        - SearchPipeline\n        - SearchResult\n        - build")
    return "\n\n".join(blocks)
