"""Paraphrase and semantic similarity of two sentences."""

from moe_jax_tasks.templates import Template as T

GROUPS = {
    "paraphrase": (
        T("Sentence A: {sentence1}\nSentence B: {sentence2}\n\nDo they mean the "
          "same thing?\n\n{options}"),
        T("\"{sentence1}\" and \"{sentence2}\"\n\nAre these two paraphrases of each "
          "other?\n\n{options}"),
        T("Is the second text a rewording of the first?\n\n1: {sentence1}\n2: "
          "{sentence2}\n\n{options}"),
        T("{sentence1}\n{sentence2}\n\nSame meaning?\n\n{options}"),
    ),
    "similarity": (
        T("On a scale from 0 (unrelated) to 5 (identical meaning), how similar are "
          "these?\n\n{sentence1}\n{sentence2}\n\n{options}"),
        T("Rate the similarity of \"{sentence1}\" and \"{sentence2}\" from 0 to 5."
          "\n\n{options}"),
        T("First: {sentence1}\nSecond: {sentence2}\n\nHow close in meaning are they "
          "(0-5)?\n\n{options}"),
        T("Score the meaning overlap between the two sentences.\n\n{sentence1}\n"
          "{sentence2}\n\n{options}"),
    ),
}
