"""Reading comprehension: answer a question about a given passage."""

from moe_jax_tasks.templates import Template as T

GROUPS = {
    "rc_extractive": (
        T("Read the passage and answer the question.\n\n{context}\n\nQuestion: "
          "{question}"),
        T("{context}\n\nBased on the passage above, {question}"),
        T("Passage: {context}\nQ: {question}\nA:"),
        T("Answer using the text below.\n\nQuestion: {question}\n\nText: {context}"),
        T("Here is some background: {context}\n\nNow answer this: {question}"),
    ),
    "rc_yes_no": (
        T("{passage}\n\nAccording to this text about {title}, {question}?\n\n"
          "{options}"),
        T("Passage: {passage}\n\nQuestion: {question}?\n\n{options}"),
        T("Read about {title}:\n{passage}\n\nIs the answer to \"{question}\" yes or "
          "no?\n\n{options}"),
        T("{question}?\n\nUse this passage to decide: {passage}\n\n{options}"),
    ),
    "rc_answer_check": (
        T("{paragraph}\n\nQuestion: {question}\nProposed answer: {response}\n\nIs "
          "the proposed answer correct?\n\n{options}"),
        T("Read the paragraph, then judge the answer.\n\n{paragraph}\n\nQ: "
          "{question}\nA: {response}\n\nIs this right?\n\n{options}"),
        T("Given \"{paragraph}\", would \"{response}\" be a true answer to "
          "\"{question}\"?\n\n{options}"),
        T("Question about the text: {question}\nSomeone answered: {response}\n"
          "Text: {paragraph}\n\nDid they get it right?\n\n{options}"),
    ),
    "rc_cloze": (
        T("{passage}\n\nFill in the @placeholder in this sentence: {query}\n\n"
          "{options}"),
        T("Read the article and complete the statement.\n\nArticle: {passage}\n\n"
          "Statement: {query}\n\nWhat does @placeholder stand for?\n\n{options}"),
        T("{passage}\n\nWhich entity is missing (@placeholder) in: {query}\n\n"
          "{options}"),
        T("Text: {passage}\nIncomplete sentence: {query}\nThe missing entity is:\n\n"
          "{options}"),
    ),
    "rc_conversational": (
        T("{context}\n\nConversation so far:\n{history}\n\nNext question: "
          "{question}"),
        T("Read the story and continue answering questions about it.\n\n{context}"
          "\n\n{history}\nQ: {question}\nA:"),
        T("Story: {context}\n\nPrevious questions and answers:\n{history}\n\n"
          "Answer briefly: {question}"),
        T("{history}\n{question}\n\nAnswer the last question using this text: "
          "{context}"),
    ),
}
