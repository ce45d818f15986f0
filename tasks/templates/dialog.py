"""Dialog: continue an information-seeking conversation; and its inversion."""

from moe_jax_tasks.templates import Template as T

GROUPS = {
    "dialog": (
        T("{context}\n\n{history}\nUser: {question}\nAssistant:"),
        T("Background: {context}\n\nConversation:\n{history}\nUser: {question}\n\n"
          "Write the assistant's next reply."),
        T("Continue the dialog using the information below.\n\n{context}\n\n"
          "{history}\nUser: {question}"),
        T("{history}\nUser: {question}\n\nReply helpfully, based on: {context}"),
    ),
    "dialog_inversion": (
        T("{context}\n\n{history}\nAssistant: {answer}\n\nWhat did the user ask "
          "just before this reply?", "{question}"),
        T("Conversation:\n{history}\n[missing user turn]\nAssistant: {answer}\n\n"
          "Background: {context}\n\nWrite the missing user turn.", "{question}"),
        T("The assistant answered \"{answer}\". Given this background and earlier "
          "turns, what was the question?\n\n{context}\n\n{history}", "{question}"),
        T("Reconstruct the user's message.\n\n{history}\nAssistant: {answer}",
          "{question}"),
    ),
}
