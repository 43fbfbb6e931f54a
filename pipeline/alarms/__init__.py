"""Alarm rules per device, and open alarms adopted after a restart."""
