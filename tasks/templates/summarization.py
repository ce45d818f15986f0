"""Summarization: condense an article, an email, a chat or a set of opinions."""

from moe_jax_tasks.templates import Template as T

GROUPS = {
    "summarize": (
        T("{text}\n\nSummarize the article above."),
        T("Write a short summary of this text.\n\n{text}"),
        T("Article: {text}\n\nSummary:"),
        T("{text}\n\nIn a few sentences, what is this about?"),
        T("Give the key points of the following news story.\n\n{text}"),
    ),
    "subject_line": (
        T("{text}\n\nWrite a subject line for this email."),
        T("Email body: {text}\n\nSubject:"),
        T("Suggest a short title for the email below.\n\n{text}"),
        T("What would be a fitting subject for this message?\n\n{text}"),
    ),
    "dialogue_summary": (
        T("{text}\n\nSummarize this conversation."),
        T("Chat log:\n{text}\n\nWhat happened in this chat?"),
        T("Briefly describe the dialogue below.\n\n{text}"),
        T("Conversation:\n{text}\n\nSummary:"),
    ),
    "opinion_consensus": (
        T("Reviews of {topic}:\n{text}\n\nWhat do the critics agree on?"),
        T("{text}\n\nSum up these opinions about {topic} in one sentence."),
        T("Here are several reviews of {topic}.\n\n{text}\n\nConsensus:"),
        T("Write the overall verdict on {topic} given these reviews:\n{text}"),
    ),
    "debate_claim": (
        T("Debate topic: {topic}\nArguments:\n{text}\n\nWhat claim do these "
          "arguments support?"),
        T("{text}\n\nState the main claim argued for above (topic: {topic})."),
        T("These sentences argue a point about \"{topic}\".\n{text}\n\nThe point is:"),
        T("Summarize the position defended in this argument about {topic}.\n\n"
          "{text}"),
    ),
}
