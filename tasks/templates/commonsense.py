"""Commonsense reasoning: causes and effects, plausible endings, everyday goals."""

from moe_jax_tasks.templates import Template as T

GROUPS = {
    "cause_effect": (
        T("{premise}\n\nWhat was the {relation} of this?\n\n{options}"),
        T("Premise: {premise}\nWhich choice is the more likely {relation}?\n\n"
          "{options}"),
        T("Consider the situation: {premise}\nChoose its most plausible "
          "{relation}.\n\n{options}"),
        T("\"{premise}\" What is the {relation}?\n\n{options}"),
    ),
    "next_ending": (
        T("{context}\n\nHow does this most likely continue?\n\n{options}"),
        T("Pick the best ending for the text.\n\n{context}\n\n{options}"),
        T("Beginning: {context}\nWhich continuation makes the most sense?\n\n"
          "{options}"),
        T("Finish the story: {context}\n\n{options}"),
    ),
    "goal_solution": (
        T("Goal: {goal}\n\nWhich way of doing it works best?\n\n{options}"),
        T("How would you {goal}?\n\n{options}"),
        T("I want to achieve this: {goal}\nWhat should I do?\n\n{options}"),
        T("Choose the more sensible solution for \"{goal}\".\n\n{options}"),
    ),
    "context_mc": (
        T("{context}\n\nQuestion: {question}\n\n{options}"),
        T("Read the text and answer.\n\n{context}\n\n{question}\n\n{options}"),
        T("{question}\n\nThink about this situation: {context}\n\n{options}"),
        T("Context: {context}\nQ: {question}\nPick the best answer.\n\n{options}"),
    ),
    "last_word": (
        T("{context}\n\nWhat word most likely comes next?"),
        T("Complete the passage with one word: {context}"),
        T("Predict the final word of this text.\n\n{context}"),
        T("{context} ___\n\nFill in the blank."),
    ),
}
