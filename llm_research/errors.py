"""The one error type for input a user can fix (imported by every layer, so it depends on none)."""


class ConfigError(ValueError):
  """Input a user can fix, with a message that names it: a config key or value, the mesh for
  these devices, the data, the workdir. The command-line tools print it as one line."""
