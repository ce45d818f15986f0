"""Natural Instructions v2: the task's own Definition is the instruction.

The Definition goes in the preamble, so a few-shot prompt states it once and then
lists the task's Positive Examples before the instance.
"""

from moe_jax_tasks.templates import Template as T

GROUPS = {
    "niv2": (
        T("Input: {input}\nOutput:", preamble="{definition}\n\n"),
        T("{input}", preamble="Instructions: {definition}\n\n"),
        T("Now solve this instance.\n{input}", preamble="Task: {definition}\n\n"),
        T("Example input: {input}\nExample output:",
          preamble="Follow the task definition.\n{definition}\n\n"),
        T("Q: {input}\nA:", preamble="{definition}\n\n"),
    ),
}
