"""Translation between two named languages."""

from moe_jax_tasks.templates import Template as T

GROUPS = {
    "translate": (
        T("Translate to {target_language}:\n\n{text}"),
        T("{text}\n\nHow do you say this in {target_language}?"),
        T("{source_language}: {text}\n{target_language}:"),
        T("Render the following {source_language} text in {target_language}.\n\n"
          "{text}"),
        T("Please give a {target_language} version of this sentence: {text}"),
    ),
}
