"""Muffin's TFDS-backed tasks: the Flan 2021 datasets and the two released dialog sets.

For each task: the template group it is rendered with, whether it has answer options,
the TFDS split it trains on, and a normalizer turning a raw TFDS example (the feature
names of the TFDS builder named in catalog/muffin_tfds_sources.tsv) into text fields:
scalar strings, `answer`, and for option tasks `options` (a 1-D string tensor).
"""

import dataclasses
import string
from typing import Callable, Optional

import tensorflow as tf

Example = dict[str, tf.Tensor]


@dataclasses.dataclass(frozen=True)
class Spec:
  """How one Muffin task is normalized and rendered.

  Attributes:
    group: template group (see templates/).
    normalize: raw TFDS example -> text fields.
    family: template family module, used as the catalog category.
    has_options: whether the task has an answer-option list.
    train_split: the TFDS split trained on.
    keep: optional predicate on the raw example (e.g. drop unlabelled rows).
  """
  group: str
  normalize: Callable[[Example], Example]
  family: str
  has_options: bool = False
  train_split: str = "train"
  keep: Optional[Callable[[Example], tf.Tensor]] = None


def _labelled(ex: Example, choices: list[str], label_key: str = "label") -> Example:
  options = tf.constant(choices)
  return {"options": options, "answer": tf.gather(options, ex[label_key])}


def _first(texts: tf.Tensor, default: str = "") -> tf.Tensor:
  """First element of a 1-D string tensor, or `default` when it is empty."""
  padded = tf.concat([texts, tf.constant([default])], axis=0)
  return padded[0]


def _has_label(ex: Example) -> tf.Tensor:
  return ex["label"] >= 0


def _join_nested(value: tf.Tensor, inner: str, outer: str) -> tf.Tensor:
  """Joins a rank-2 (dense or ragged) string tensor, e.g. DART's triple set."""
  if isinstance(value, tf.RaggedTensor) or value.shape.rank == 2:
    value = tf.strings.reduce_join(value, axis=-1, separator=inner)
  return tf.strings.reduce_join(value, separator=outer)


_YES_NO = ["yes", "no"]
_NLI3 = ["yes", "it is not possible to tell", "no"]


def _nli(premise_key, hypothesis_key, choices, label_map=None):
  """NLI normalizer; `label_map[i]` gives the option index of TFDS label i."""
  def normalize(ex):
    label = ex["label"]
    if label_map is not None:
      label = tf.gather(tf.constant(label_map, tf.int64), label)
    return {"premise": ex[premise_key], "hypothesis": ex[hypothesis_key],
            **_labelled({"label": label}, choices)}
  return normalize


def _squad(ex):
  return {"context": ex["context"], "question": ex["question"],
          "answer": _first(ex["answers"]["text"], "unanswerable")}


def _translation(source, target, source_language, target_language):
  def normalize(ex):
    return {"text": ex[source], "source_language": tf.constant(source_language),
            "target_language": tf.constant(target_language), "answer": ex[target]}
  return normalize


def _summary(text_key, summary_key):
  return lambda ex: {"text": ex[text_key], "answer": ex[summary_key]}


def _sentiment(text_key, choices, label_key="label"):
  def normalize(ex):
    return {"text": ex[text_key], **_labelled(ex, choices, label_key)}
  return normalize


def _paraphrase(key1, key2):
  def normalize(ex):
    return {"sentence1": ex[key1], "sentence2": ex[key2],
            **_labelled(ex, ["no", "yes"])}
  return normalize


def _two_choices(question_key, first, second, *, label_offset=0):
  def normalize(ex):
    options = tf.stack([ex[first], ex[second]])
    return {question_key: ex[question_key], "options": options,
            "answer": tf.gather(options, ex["label"] - label_offset)}
  return normalize


_PUNCTUATION = "[" + "".join("\\" + c for c in string.punctuation) + "]"


def _text_repair(corrupt: Callable[[tf.Tensor], tf.Tensor]):
  return lambda ex: {"text": corrupt(ex["en"]), "answer": ex["en"]}


def _bool_q(ex):
  answer = tf.where(ex["answer"], "yes", "no")
  return {"title": ex["title"], "passage": ex["passage"],
          "question": ex["question"], "options": tf.constant(_YES_NO),
          "answer": answer}


def _wsc(ex):
  return {"text": ex["text"], "pronoun": ex["span2_text"],
          "candidate": ex["span1_text"], **_labelled(ex, ["no", "yes"])}


def _wic(ex):
  return {"word": ex["word"], "sentence1": ex["sentence1"],
          "sentence2": ex["sentence2"], **_labelled(ex, ["no", "yes"])}


def _record(ex):
  return {"passage": ex["passage"], "query": ex["query"],
          "options": ex["entities"], "answer": _first(ex["answers"])}


def _multirc(ex):
  return {"paragraph": ex["paragraph"], "question": ex["question"],
          "response": ex["answer"], **_labelled(ex, ["False", "True"])}


def _coqa(ex):
  questions, answers = ex["questions"], ex["answers"]["input_text"]
  turns = tf.strings.join(["Q: ", questions[:-1], "\nA: ", answers[:-1]])
  return {"context": ex["story"],
          "history": tf.strings.reduce_join(turns, separator="\n"),
          "question": questions[-1], "answer": answers[-1]}


def _quac(ex):
  return {"context": ex["context"], "question": ex["question"],
          "answer": ex["orig_answer"]["text"]}


def _drop(ex):
  return {"context": ex["passage"], "question": ex["question"],
          "answer": ex["answer"]}


def _copa(ex):
  options = tf.stack([ex["choice1"], ex["choice2"]])
  return {"premise": ex["premise"], "relation": ex["question"],
          "options": options, "answer": tf.gather(options, ex["label"])}


def _story_cloze(ex):
  context = tf.strings.join([ex[f"input_sentence_{i}"] for i in range(1, 5)],
                            separator=" ")
  options = tf.stack([ex["sentence_quiz1"], ex["sentence_quiz2"]])
  return {"context": context, "options": options,
          "answer": tf.gather(options, ex["answer_right_ending"] - 1)}


def _hellaswag(ex):
  return {"context": ex["context"], "options": ex["endings"],
          "answer": tf.gather(ex["endings"], ex["label"])}


def _cosmos(ex):
  options = tf.stack([ex[f"answer{i}"] for i in range(4)])
  return {"context": ex["context"], "question": ex["question"],
          "options": options, "answer": tf.gather(options, ex["label"])}


def _arc(ex):
  choices = ex["choices"]
  index = tf.argmax(tf.cast(tf.equal(choices["label"], ex["answerKey"]), tf.int32))
  return {"question": ex["question"], "options": choices["text"],
          "answer": tf.gather(choices["text"], index)}


def _openbookqa(ex):
  q = ex["question"]
  options = tf.stack([q["choice_A"], q["choice_B"], q["choice_C"], q["choice_D"]])
  return {"question": q["stem"], "options": options,
          "answer": tf.gather(options, ex["answerKey"])}


def _winogrande(ex):
  options = tf.stack([ex["option1"], ex["option2"]])
  return {"sentence": ex["sentence"], "options": options,
          "answer": tf.gather(options, ex["label"])}


def _dpr(ex):
  return {"sentence": ex["sentence"], "pronoun": ex["pronoun"],
          "options": ex["candidates"],
          "answer": tf.gather(ex["candidates"], ex["label"])}


def _stsb(ex):
  options = tf.constant([str(i) for i in range(6)])
  score = tf.cast(tf.round(ex["label"]), tf.int64)
  return {"sentence1": ex["sentence1"], "sentence2": ex["sentence2"],
          "options": options, "answer": tf.gather(options, score)}


def _lambada(ex):
  words = tf.strings.split(tf.strings.strip(ex["passage"]))
  return {"context": tf.strings.reduce_join(words[:-1], separator=" "),
          "answer": words[-1]}


def _opinion_rt(ex):
  return {"topic": ex["_movie_name"],
          "text": tf.strings.reduce_join(ex["_critics"]["value"], separator="\n"),
          "answer": ex["_critic_consensus"]}


def _opinion_idebate(ex):
  return {"topic": ex["_debate_name"],
          "text": tf.strings.reduce_join(ex["_argument_sentences"]["value"],
                                         separator="\n"),
          "answer": ex["_claim"]}


def _trec(ex):
  return {"question": ex["text"],
          **_labelled(ex, ["description", "entity", "abbreviation", "human",
                           "number", "location"], "label-coarse")}


def _ag_news(ex):
  return {"title": ex["title"], "text": ex["description"],
          **_labelled(ex, ["World", "Sports", "Business", "Science/Tech"])}


def _sentiment140(ex):
  # Polarity is 0 (negative), 2 (neutral) or 4 (positive).
  options = tf.constant(["negative", "neutral", "positive"])
  return {"text": ex["text"], "options": options,
          "answer": tf.gather(options, ex["polarity"] // 2)}


def _common_gen(ex):
  return {"concepts": tf.strings.reduce_join(ex["concepts"], separator=", "),
          "answer": ex["target"]}


def _dart(ex):
  return {"triples": _join_nested(ex["tripleset"], " | ", "; "),
          "answer": ex["target"]}


def _web_nlg(ex):
  return {"triples": tf.strings.reduce_join(ex["input"], separator="; "),
          "answer": ex["target"]}


def _e2e(ex):
  return {"attributes": ex["meaning_representation"], "answer": ex["target"]}


def _trivia_qa(ex):
  return {"question": ex["question"], "answer": ex["answer"]["value"]}


def _nq_open(ex):
  return {"question": ex["question"], "answer": _first(ex["answer"])}


def _wiki_dialog(ex):
  utterances = ex["utterances"]
  return {"context": tf.strings.join([ex["title"], "\n", ex["passage"]]),
          "history": _dialog_history(utterances[:-2]),
          "question": utterances[-2], "answer": utterances[-1]}


def _qrecc(ex):
  return {"context": tf.constant(""), "history": _dialog_history(ex["context"]),
          "question": ex["question"], "answer": ex["answer"]}


def _dialog_history(turns: tf.Tensor) -> tf.Tensor:
  """Alternating user / assistant turns, oldest first, one per line."""
  speakers = tf.where(tf.range(tf.size(turns)) % 2 == 0, "User: ", "Assistant: ")
  return tf.strings.reduce_join(tf.strings.join([speakers, turns]), separator="\n")


def _nli_spec(premise, hypothesis, choices=None, label_map=None):
  return Spec("nli", _nli(premise, hypothesis, choices or _NLI3, label_map), "nli",
              has_options=True, keep=_has_label)


_WMT_LANGUAGES = {"de": "German", "tr": "Turkish", "cs": "Czech", "fi": "Finnish",
                  "ro": "Romanian", "ru": "Russian"}

SPECS: dict[str, Spec] = {
    "bool_q": Spec("rc_yes_no", _bool_q, "reading_comprehension", True),
    "rte": _nli_spec("premise", "hypothesis", _YES_NO),
    "wsc": Spec("pronoun_target", _wsc, "coreference", True),
    "wic": Spec("word_sense", _wic, "classification", True),
    "natural_questions": Spec("cbqa", _nq_open, "closed_book_qa"),
    "record": Spec("rc_cloze", _record, "reading_comprehension", True),
    "trivia_qa": Spec("cbqa", _trivia_qa, "closed_book_qa"),
    "math_dataset": Spec("arithmetic", lambda ex: {"question": ex["question"],
                                                   "answer": ex["answer"]},
                         "closed_book_qa"),
    "aeslc": Spec("subject_line", _summary("email_body", "subject_line"),
                  "summarization"),
    "cnn_dailymail": Spec("summarize", _summary("article", "highlights"),
                          "summarization"),
    "gigaword": Spec("summarize", _summary("document", "summary"), "summarization"),
    "multi_news": Spec("summarize", _summary("document", "summary"),
                       "summarization"),
    "newsroom": Spec("summarize", _summary("text", "summary"), "summarization"),
    "opinion_abstracts_rotten_tomatoes": Spec("opinion_consensus", _opinion_rt,
                                              "summarization"),
    "opinion_abstracts_idebate": Spec("debate_claim", _opinion_idebate,
                                      "summarization"),
    "coqa": Spec("rc_conversational", _coqa, "reading_comprehension"),
    "samsum": Spec("dialogue_summary", _summary("dialogue", "summary"),
                   "summarization"),
    "xsum": Spec("summarize", _summary("document", "summary"), "summarization"),
    "squad_v1": Spec("rc_extractive", _squad, "reading_comprehension"),
    "squad_v2": Spec("rc_extractive", _squad, "reading_comprehension"),
    "drop": Spec("rc_extractive", _drop, "reading_comprehension"),
    "quac": Spec("rc_extractive", _quac, "reading_comprehension"),
    "multirc": Spec("rc_answer_check", _multirc, "reading_comprehension", True),
    "ag_news_subset": Spec("topic", _ag_news, "classification", True),
    "sentiment140": Spec("sentiment", _sentiment140, "sentiment", True),
    "story_cloze": Spec("next_ending", _story_cloze, "commonsense", True,
                        train_split="validation"),
    "imdb_reviews": Spec("sentiment", _sentiment("text", ["negative", "positive"]),
                         "sentiment", True, keep=_has_label),
    "paws_wiki": Spec("paraphrase", _paraphrase("sentence1", "sentence2"),
                      "paraphrase", True),
    "definite_pronoun_resolution": Spec("pronoun_choice", _dpr, "coreference",
                                        True),
    "glue_mrpc": Spec("paraphrase", _paraphrase("sentence1", "sentence2"),
                      "paraphrase", True),
    "glue_qqp": Spec("paraphrase", _paraphrase("question1", "question2"),
                     "paraphrase", True),
    "copa": Spec("cause_effect", _copa, "commonsense", True),
    "winogrande": Spec("fill_blank", _winogrande, "coreference", True),
    "yelp_polarity_reviews": Spec("sentiment",
                                  _sentiment("text", ["negative", "positive"]),
                                  "sentiment", True),
    "cosmos_qa": Spec("context_mc", _cosmos, "commonsense", True),
    "para_crawl_enes": Spec("translate",
                            _translation("en", "es", "English", "Spanish"),
                            "translation"),
    "wmt14_enfr": Spec("translate", _translation("en", "fr", "English", "French"),
                       "translation"),
    "common_gen": Spec("concepts_to_sentence", _common_gen, "struct_to_text"),
    "dart": Spec("triples_to_text", _dart, "struct_to_text"),
    "e2e_nlg": Spec("meaning_representation", _e2e, "struct_to_text"),
    "web_nlg_en": Spec("triples_to_text", _web_nlg, "struct_to_text"),
    "wiki_lingua_english_en": Spec("summarize", _summary("source", "target"),
                                   "summarization"),
    "true_case": Spec("true_case", _text_repair(tf.strings.lower), "text_repair"),
    "fix_punct": Spec("fix_punct", _text_repair(
        lambda t: tf.strings.regex_replace(t, _PUNCTUATION, "")), "text_repair"),
    "word_segment": Spec("word_segment", _text_repair(
        lambda t: tf.strings.regex_replace(t, r"\s+", "")), "text_repair"),
    "cb": _nli_spec("premise", "hypothesis", label_map=[0, 2, 1]),
    "cola": Spec("acceptability", lambda ex: {
        "sentence": ex["sentence"], **_labelled(ex, ["no", "yes"])},
                 "classification", True),
    "sst2": Spec("sentiment", _sentiment("sentence", ["negative", "positive"]),
                 "sentiment", True),
    "mnli_matched": _nli_spec("premise", "hypothesis"),
    "mnli_mismatched": _nli_spec("premise", "hypothesis"),
    "qnli": Spec("qnli", lambda ex: {
        "question": ex["question"], "sentence": ex["sentence"],
        **_labelled(ex, _YES_NO)}, "nli", True),
    "wnli": _nli_spec("sentence1", "sentence2", _YES_NO, label_map=[1, 0]),
    "snli": _nli_spec("premise", "hypothesis"),
    "trec": Spec("question_type", _trec, "classification", True),
    "stsb": Spec("similarity", _stsb, "paraphrase", True),
    "piqa": Spec("goal_solution", _two_choices("goal", "sol1", "sol2"),
                 "commonsense", True),
    "openbookqa": Spec("cbqa_mc", _openbookqa, "closed_book_qa", True),
    "hellaswag": Spec("next_ending", _hellaswag, "commonsense", True),
    "arc_challenge": Spec("cbqa_mc", _arc, "closed_book_qa", True),
    "arc_easy": Spec("cbqa_mc", _arc, "closed_book_qa", True),
    "anli_r1": _nli_spec("context", "hypothesis"),
    "anli_r2": _nli_spec("context", "hypothesis"),
    "anli_r3": _nli_spec("context", "hypothesis"),
    "lambada": Spec("last_word", _lambada, "commonsense"),
    "unified_qa_science_inst": Spec("cbqa", lambda ex: {
        "question": ex["input"], "answer": ex["output"]}, "closed_book_qa"),
    "wiki_dialog": Spec("dialog", _wiki_dialog, "dialog"),
    "qrecc": Spec("dialog", _qrecc, "dialog"),
}
for _code, _language in _WMT_LANGUAGES.items():
  SPECS[f"wmt16_translate_{_code}en"] = Spec(
      "translate", _translation(_code, "en", _language, "English"), "translation")
