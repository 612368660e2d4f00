"""The search API: `create_app(components, settings)` over already-built components; `kvrank serve` runs it."""

from kvrank.api.app import create_app
from kvrank.api.service import Components
from kvrank.api.settings import Settings

__all__ = ["Components", "Settings", "create_app"]
