"""Coreference: which entity a pronoun or blank refers to."""

from moe_jax_tasks.templates import Template as T

GROUPS = {
    "pronoun_target": (
        T("{text}\n\nIn the sentence above, does \"{pronoun}\" refer to "
          "\"{candidate}\"?\n\n{options}"),
        T("Sentence: {text}\nDoes the word \"{pronoun}\" mean {candidate} here?\n\n"
          "{options}"),
        T("Read: {text}\n\nIs \"{candidate}\" the referent of \"{pronoun}\"?\n\n"
          "{options}"),
        T("Coreference check. Text: {text}\nPronoun: {pronoun}\nCandidate: "
          "{candidate}\nSame entity?\n\n{options}"),
    ),
    "fill_blank": (
        T("{sentence}\n\nWhat belongs in the blank (_)?\n\n{options}"),
        T("Fill in the blank: {sentence}\n\n{options}"),
        T("Which option makes the sentence sensible? {sentence}\n\n{options}"),
        T("Sentence with a gap: {sentence}\nBest choice for the gap:\n\n{options}"),
    ),
    "pronoun_choice": (
        T("{sentence}\n\nWho or what is \"{pronoun}\" in this sentence?\n\n"
          "{options}"),
        T("In \"{sentence}\", the pronoun \"{pronoun}\" refers to which of these?\n\n"
          "{options}"),
        T("Resolve the pronoun \"{pronoun}\".\n\n{sentence}\n\n{options}"),
        T("Sentence: {sentence}\nWhat does \"{pronoun}\" point to?\n\n{options}"),
    ),
}
