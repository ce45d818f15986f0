"""Natural language inference: does a premise support a hypothesis?"""

from moe_jax_tasks.templates import Template as T

GROUPS = {
    "nli": (
        T("Premise: {premise}\nHypothesis: {hypothesis}\n\nDoes the premise entail "
          "the hypothesis?\n\n{options}"),
        T("{premise}\n\nGiven the text above, is it true that \"{hypothesis}\"?\n\n"
          "{options}"),
        T("Read the statement and decide whether the claim follows from it.\n\n"
          "Statement: {premise}\nClaim: {hypothesis}\n\n{options}"),
        T("If \"{premise}\", can we infer that \"{hypothesis}\"?\n\n{options}"),
        T("{premise}\nQuestion: does this mean that {hypothesis}\n\n{options}"),
        T("Here is a passage: {premise}\n\nWould a careful reader agree with the "
          "following sentence? {hypothesis}\n\n{options}"),
    ),
    "qnli": (
        T("Question: {question}\nSentence: {sentence}\n\nDoes the sentence answer "
          "the question?\n\n{options}"),
        T("Does \"{sentence}\" contain the answer to \"{question}\"?\n\n{options}"),
        T("I want to know: {question}\nIs this sentence helpful for that? "
          "{sentence}\n\n{options}"),
        T("Check whether the text answers the question.\n\nText: {sentence}\n"
          "Question: {question}\n\n{options}"),
    ),
}
