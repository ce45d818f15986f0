"""Chain of thought: reason step by step, then state the answer; and its inversion.

Every target ends with "the answer is <answer>." so that the evaluation
postprocessors (evals/postprocessors.py) can find the final answer.
"""

from moe_jax_tasks.templates import Template as T

GROUPS = {
    "cot": (
        T("{question}\nThink it through step by step.",
          "{chain_of_thought} So the answer is {answer}."),
        T("Question: {question}\nGive your reasoning first, then the answer.",
          "{chain_of_thought} Therefore, the answer is {answer}."),
        T("{question}\n\nExplain your thinking before answering.",
          "Reasoning: {chain_of_thought}\nSo the answer is {answer}."),
        T("Answer the question below, showing your work.\n\n{question}",
          "{chain_of_thought}\nThe answer is {answer}."),
        T("Q: {question}\nA: Let us reason about it.",
          "{chain_of_thought} Hence the answer is {answer}."),
    ),
    "cot_inversion": (
        T("Write a question whose answer is \"{answer}\" and that can be solved with "
          "this reasoning: {chain_of_thought}", "{question}"),
        T("Reasoning: {chain_of_thought}\nAnswer: {answer}\n\nWhat was the "
          "question?", "{question}"),
        T("Here is an explanation and its conclusion ({answer}). Reconstruct the "
          "question it answers.\n\n{chain_of_thought}", "{question}"),
        T("Come up with the question for this step-by-step solution.\n\n"
          "{chain_of_thought} So the answer is {answer}.", "{question}"),
    ),
}
