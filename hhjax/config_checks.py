"""Every config field checked once, before any work starts (filled in by the next change)."""

import ml_collections


def validate(config: ml_collections.ConfigDict) -> None:
  del config
