"""Durations in progress lines and tables."""

from hhjax import durations


def test_durations_read_as_minutes_under_an_hour_and_hours_beyond():
  assert durations.format_duration(0) == '0:00'
  assert durations.format_duration(59.9) == '0:59'   # whole seconds, rounded down
  assert durations.format_duration(3599) == '59:59'
  assert durations.format_duration(3600 * 26 + 62) == '26:01:02'
  assert durations.format_duration(-5) == '0:00'     # an estimate below zero reads as none
