"""A Runner that answers from a script: no processes, no sleeping."""

from launch.runner import Runner


class ScriptedRunner(Runner):
  """Answers probes from a script; records every command, sleeps never."""

  def __init__(self, answers):
    super().__init__(dry_run=False)
    self.answers = list(answers)  # str (stdout) or int (a failing exit code)
    self.slept = []

  def sleep(self, seconds):
    self.slept.append(seconds)

  def _call(self, argv):
    return 0

  def _output(self, argv):
    answer = self.answers.pop(0)
    return (answer, "", "boom") if isinstance(answer, int) else (0, answer, "")
