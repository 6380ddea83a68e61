"""Durations as people read them in logs and tables: '1:02:03', or '2:03' under an hour."""


def format_duration(seconds: float) -> str:
  """Whole seconds (rounded down, at least 0) as h:mm:ss, or m:ss under an hour."""
  minutes, seconds = divmod(int(max(0, seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}:{minutes:02d}:{seconds:02d}' if hours else f'{minutes}:{seconds:02d}'
