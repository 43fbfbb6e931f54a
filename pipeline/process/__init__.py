"""The daemon and its process life: admission of windows, state file, metrics, watchdog, serve."""
