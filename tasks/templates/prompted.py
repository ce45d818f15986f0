"""Already-prompted data (P3 for T0-SF; user files for unreleased tasks).

The text of `inputs` is a finished prompt, so these templates only vary the wrapper
and where the answer choices go.
"""

from moe_jax_tasks.templates import Template as T

GROUPS = {
    "prompted": (
        T("{inputs}\n\n{options}"),
        T("{inputs}\n\n{options}\nAnswer:"),
        T("{inputs}\n{options}"),
        T("Respond to the following.\n\n{inputs}\n\n{options}"),
    ),
}
