"""Sentiment: the polarity of a review or a short post."""

from moe_jax_tasks.templates import Template as T

GROUPS = {
    "sentiment": (
        T("{text}\n\nIs the sentiment of this text positive or negative?\n\n"
          "{options}"),
        T("Review: {text}\n\nHow does the writer feel?\n\n{options}"),
        T("What is the tone of the following?\n\n{text}\n\n{options}"),
        T("Classify the opinion expressed here: \"{text}\"\n\n{options}"),
        T("{text}\nDid the author like it?\n\n{options}"),
    ),
}
