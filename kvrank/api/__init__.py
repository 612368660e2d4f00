"""The search API: `create_app(pipeline, settings)` over a built `SearchPipeline`; `kvrank serve` runs it."""

from kvrank.api.app import create_app
from kvrank.api.settings import Settings

__all__ = ["Settings", "create_app"]
