"""Text classification: topic, question type, grammaticality and word sense."""

from moe_jax_tasks.templates import Template as T

GROUPS = {
    "topic": (
        T("{title}\n\n{text}\n\nWhat is this article about?\n\n{options}"),
        T("Which section of a newspaper does this belong to?\n\n{title}: {text}\n\n"
          "{options}"),
        T("Headline: {title}\nStory: {text}\n\nTopic:\n\n{options}"),
        T("Categorize the news item \"{title}\".\n{text}\n\n{options}"),
    ),
    "question_type": (
        T("What kind of thing does this question ask for? {question}\n\n{options}"),
        T("Question: {question}\n\nThe expected answer is a:\n\n{options}"),
        T("Classify the answer type of \"{question}\".\n\n{options}"),
        T("{question}\n\nWould the answer be a description, an entity, an "
          "abbreviation, a person, a number or a location?\n\n{options}"),
    ),
    "acceptability": (
        T("Is this sentence grammatically acceptable?\n\n{sentence}\n\n{options}"),
        T("Sentence: {sentence}\n\nWould a native speaker find it well formed?\n\n"
          "{options}"),
        T("\"{sentence}\" Is this correct English?\n\n{options}"),
        T("Judge the grammar of: {sentence}\n\n{options}"),
    ),
    "word_sense": (
        T("Does \"{word}\" have the same meaning in these two sentences?\n\n"
          "{sentence1}\n{sentence2}\n\n{options}"),
        T("Sentence 1: {sentence1}\nSentence 2: {sentence2}\n\nIs the word "
          "\"{word}\" used in the same sense in both?\n\n{options}"),
        T("{sentence1}\n{sentence2}\n\nSame sense of \"{word}\"?\n\n{options}"),
        T("Compare the use of the word {word}.\nA: {sentence1}\nB: {sentence2}\n\n"
          "{options}"),
    ),
}
