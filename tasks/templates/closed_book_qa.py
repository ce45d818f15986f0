"""Closed-book question answering: answer from knowledge, with no passage."""

from moe_jax_tasks.templates import Template as T

GROUPS = {
    "cbqa": (
        T("{question}"),
        T("Answer the following question: {question}"),
        T("Q: {question}\nA:"),
        T("What is the answer to this question? {question}"),
        T("Please answer this trivia question.\n\n{question}"),
        T("Question: {question}\nAnswer:"),
    ),
    "cbqa_mc": (
        T("{question}\n\n{options}"),
        T("Pick the correct answer to this question.\n\n{question}\n\n{options}"),
        T("Question: {question}\n\nWhich choice is right?\n\n{options}"),
        T("Test question: {question}\n\n{options}\nAnswer:"),
        T("Use what you know about science to answer: {question}\n\n{options}"),
    ),
    "arithmetic": (
        T("{question}"),
        T("Solve this problem: {question}"),
        T("Math question: {question}\nAnswer:"),
        T("Work out the answer. {question}"),
    ),
}
