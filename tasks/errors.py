"""The errors moe_jax_tasks anticipates: missing or malformed data, bad settings.

Every exception class of the package derives from `Error`, and its message names the
problem and the fix in one line. `python -m moe_jax_tasks` prints only that message
(exit status 2); anything else is a bug and keeps its traceback.
"""


class Error(Exception):
  """An anticipated problem with the user's data, settings or arguments."""


class UsageError(Error, ValueError):
  """A missing or invalid setting, flag or argument."""
