"""Structure to text: concepts, triples or meaning representations to prose."""

from moe_jax_tasks.templates import Template as T

GROUPS = {
    "concepts_to_sentence": (
        T("Write a sentence that uses all of these words: {concepts}"),
        T("Concepts: {concepts}\n\nMake a natural sentence containing them."),
        T("Combine {concepts} into one everyday sentence."),
        T("Here are some words: {concepts}. Describe a scene with them."),
    ),
    "triples_to_text": (
        T("Express these facts as a sentence.\n\n{triples}"),
        T("Data: {triples}\n\nDescribe the data in plain English."),
        T("Turn the following triples into fluent text: {triples}"),
        T("{triples}\n\nWrite a sentence stating this information."),
    ),
    "meaning_representation": (
        T("Describe the restaurant given these attributes: {attributes}"),
        T("Attributes: {attributes}\n\nWrite a short review-style sentence."),
        T("Turn this record into a sentence: {attributes}"),
        T("{attributes}\n\nWhat would a sentence expressing all of this say?"),
    ),
}
