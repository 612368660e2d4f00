"""The integrations as optional extras: without its framework, importing one says how to install it.
(Their behaviour is tested in test_integrations_langchain.py and test_integrations_llama_index.py.)"""

from __future__ import annotations

import importlib
import sys

import pytest


@pytest.mark.parametrize(("module", "missing", "extra"), [
    ("kvrank.integrations.langchain", "langchain_core", "langchain"),
    ("kvrank.integrations.llama_index", "llama_index", "llama-index"),
])
def test_missing_framework_names_the_extra(monkeypatch: pytest.MonkeyPatch, module: str, missing: str,
                                           extra: str) -> None:
    # A None entry in sys.modules makes `import missing` (and its submodules) raise ImportError, as if absent.
    for name in [m for m in sys.modules if m == missing or m.startswith(missing + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, missing, None)
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=rf"pip install 'kvrank\[{extra}\]'"):
        importlib.import_module(module)
    monkeypatch.delitem(sys.modules, module, raising=False)  # the failed import leaves nothing behind


def test_package_imports_without_frameworks() -> None:
    """`kvrank.integrations` itself needs neither framework."""
    import kvrank.integrations

    assert "kvrank[langchain]" in (kvrank.integrations.__doc__ or "")
