"""Text repair: restore casing, punctuation or word boundaries."""

from moe_jax_tasks.templates import Template as T

GROUPS = {
    "true_case": (
        T("{text}\n\nRewrite this with correct capitalization."),
        T("Fix the casing of the following sentence: {text}"),
        T("Lowercase text: {text}\nProperly capitalized:"),
        T("Restore the capital letters in \"{text}\"."),
    ),
    "fix_punct": (
        T("{text}\n\nAdd the missing punctuation."),
        T("Punctuate this sentence correctly: {text}"),
        T("Unpunctuated: {text}\nPunctuated:"),
        T("Put commas, periods and other marks back into: {text}"),
    ),
    "word_segment": (
        T("{text}\n\nInsert the spaces between the words."),
        T("Separate the words in this string: {text}"),
        T("No spaces: {text}\nWith spaces:"),
        T("Split \"{text}\" back into words."),
    ),
}
