"""Writes the bundled sample data (tasks/sample/data) and trains its vocabulary.

Run from the repository root: `python tasks/sample/make_sample.py`. The output is
deterministic (fixed seed). Every sentence is ours: simple facts (countries and
capitals, opposites), arithmetic and template-built sentences, written in the
collection's real formats so the sample exercises the same readers as real data:

  data/muffin/<task>/train.jsonl   TFDS feature names of rte, bool_q,
                                   natural_questions, sst2
  data/p3/<subset>/train.jsonl     our P3 export (inputs, targets, answer_choices)
  data/niv2/tasks/<task>.json      natural-instructions task files
  data/cot/<dataset>_train.tsv     question <TAB> answer <TAB> chain of thought
  data/eval/...                    MMLU CSVs, a BBH file + prompt, GSM8K JSON lines
  sample_spm.model                 SentencePiece model (unigram, 1000 pieces)
"""

import csv
import json
import os
import random

import sentencepiece as spm

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")

CAPITALS = [
    ("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"),
    ("Germany", "Berlin"), ("Portugal", "Lisbon"), ("Greece", "Athens"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
    ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Hungary", "Budapest"),
    ("Ireland", "Dublin"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Cuba", "Havana"),
    ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Russia", "Moscow"),
    ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("Argentina", "Buenos Aires"), ("Colombia", "Bogota"),
    ("Denmark", "Copenhagen"), ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"),
    ("Switzerland", "Bern"), ("Australia", "Canberra"), ("Brazil", "Brasilia"),
]
OPPOSITES = [
    ("hot", "cold"), ("tall", "short"), ("fast", "slow"), ("happy", "sad"),
    ("early", "late"), ("light", "dark"), ("full", "empty"), ("open", "closed"),
    ("wet", "dry"), ("loud", "quiet"), ("strong", "weak"), ("rich", "poor"),
    ("young", "old"), ("hard", "soft"), ("clean", "dirty"), ("thick", "thin"),
    ("high", "low"), ("near", "far"), ("cheap", "expensive"), ("safe", "dangerous"),
    ("easy", "difficult"), ("deep", "shallow"), ("wide", "narrow"), ("sweet", "sour"),
    ("brave", "afraid"), ("true", "false"), ("inside", "outside"), ("first", "last"),
]
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan",
         "Jomo", "Kira", "Luis", "Mei", "Nadia", "Omar", "Priya", "Quinn", "Rosa"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "shells",
         "stamps", "oranges", "coins"]
FOODS = ["soup", "bread", "pizza", "salad", "coffee", "cake", "pasta", "tea"]
GOOD = ["delicious", "wonderful", "fresh", "excellent", "tasty", "lovely"]
BAD = ["awful", "stale", "cold and bland", "terrible", "burnt", "disappointing"]


def write_jsonl(path, records):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")


def muffin(rng):
  rte, boolq, nq, sst2 = [], [], [], []
  for i, (country, city) in enumerate(CAPITALS[:30]):
    name, item = NAMES[i % len(NAMES)], ITEMS[i % len(ITEMS)]
    count = rng.randint(2, 9)
    if i % 2 == 0:
      rte.append({"idx": i, "premise": f"{name} bought {count} {item} in {city}.",
                  "hypothesis": f"{name} bought some {item}.", "label": 0})
    else:
      rte.append({"idx": i, "premise": f"{name} lost {count} {item} in {city}.",
                  "hypothesis": f"{name} found {count} {item}.", "label": 1})
    other = CAPITALS[(i + 7) % len(CAPITALS)][1]
    asked = city if i % 2 == 0 else other
    boolq.append({"title": country,
                  "passage": f"{country} is a country whose capital city is {city}. "
                             f"Many visitors travel to {city} every year.",
                  "question": f"is {asked} the capital of {country}",
                  "answer": asked == city})
    nq.append({"question": f"what is the capital city of {country}",
               "answer": [city]})
    food = FOODS[i % len(FOODS)]
    if i % 2 == 0:
      sst2.append({"idx": i, "sentence": f"the {food} was {GOOD[i % len(GOOD)]} .",
                   "label": 1})
    else:
      sst2.append({"idx": i, "sentence": f"the {food} was {BAD[i % len(BAD)]} .",
                   "label": 0})
  for task, records in (("rte", rte), ("bool_q", boolq),
                        ("natural_questions", nq), ("sst2", sst2)):
    write_jsonl(os.path.join(DATA, "muffin", task, "train.jsonl"), records)


def p3(rng):
  polarity, choice = [], []
  for i in range(25):
    food = FOODS[i % len(FOODS)]
    good = i % 2 == 0
    word = (GOOD if good else BAD)[i % 6]
    polarity.append({
        "inputs": f"Title: {food} review {i}\nReview: The {food} arrived {word}. "
                  f"{'I would order it again.' if good else 'I will not order again.'}"
                  "\nIs this product review positive or negative?",
        "targets": "Positive" if good else "Negative",
        "answer_choices": ["Negative", "Positive"]})
    small, big = sorted(rng.sample(range(2, 40), 2))
    options = [str(big), str(small), str(big + small)]
    rng.shuffle(options)
    choice.append({
        "inputs": f"Which number is larger, {small} or {big}?\nChoose from: "
                  f"{', '.join(options)}",
        "targets": str(big), "answer_choices": options})
  write_jsonl(os.path.join(DATA, "p3", "amazon_polarity_Is_this_review",
                           "train.jsonl"), polarity)
  write_jsonl(os.path.join(DATA, "p3",
                           "cos_e_v1.11_question_option_description_text",
                           "train.jsonl"), choice)


def niv2_task(name, definition, positives, instances, category):
  task = {
      "Contributors": ["moe-jax sample"], "Source": ["moe-jax"], "URL": [],
      "Categories": [category], "Reasoning": [],
      "Definition": [definition],
      "Input_language": ["English"], "Output_language": ["English"],
      "Instruction_language": ["English"], "Domains": ["Miscellaneous"],
      "Positive Examples": [{"input": i, "output": o, "explanation": e}
                            for i, o, e in positives],
      "Negative Examples": [],
      "Instances": [{"id": f"{name.split('_')[0]}-{n:04x}", "input": i, "output": [o]}
                    for n, (i, o) in enumerate(instances)],
  }
  path = os.path.join(DATA, "niv2", "tasks", f"{name}.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(task, f, indent=1, ensure_ascii=False)


def niv2(rng):
  niv2_task(
      "task1146_country_capital",
      "You are given the name of a country. Answer with the name of its capital "
      "city.",
      [("Japan", "Tokyo", "Tokyo is the capital of Japan."),
       ("Kenya", "Nairobi", "Nairobi is the capital of Kenya.")],
      [(c, k) for c, k in CAPITALS if c not in ("Japan", "Kenya")][:30],
      "Country Capital Prediction")
  pairs = [(rng.randint(1, 99), rng.randint(1, 99)) for _ in range(30)]
  niv2_task(
      "task1087_two_number_sum",
      "Add the two numbers in the input and give their sum as a number.",
      [("[12, 30]", "42", "12 plus 30 is 42."), ("[7, 8]", "15", "7 plus 8 is 15.")],
      [(f"[{a}, {b}]", str(a + b)) for a, b in pairs], "Mathematics")
  niv2_task(
      "task1508_wordnet_antonyms",
      "Given an adjective, write a word with the opposite meaning.",
      [("up", "down", "Down is the opposite of up."),
       ("big", "small", "Small is the opposite of big.")],
      OPPOSITES, "Word Semantics")


def word_problem(rng, name, item):
  a, b = rng.randint(3, 30), rng.randint(2, 20)
  if rng.random() < 0.5:
    question = (f"{name} has {a} {item} and buys {b} more. How many {item} does "
                f"{name} have now?")
    return question, str(a + b), f"{name} starts with {a} {item}. {a} + {b} = {a + b}."
  a = a + b
  question = (f"{name} has {a} {item} and gives {b} away. How many {item} are "
              "left?")
  return question, str(a - b), f"{name} starts with {a} {item}. {a} - {b} = {a - b}."


def cot(rng):
  rows = [word_problem(rng, NAMES[i % len(NAMES)], ITEMS[i % len(ITEMS)])
          for i in range(30)]
  facts = []
  for i, (country, city) in enumerate(CAPITALS[:24]):
    other_country = CAPITALS[(i + 5) % len(CAPITALS)][0]
    if i % 2 == 0:
      facts.append((f"Could you visit {city} without leaving {country}?", "yes",
                    f"{city} is the capital of {country}, so it lies inside "
                    f"{country}."))
    else:
      facts.append((f"Is {city} the capital of {other_country}?", "no",
                    f"{city} is the capital of {country}, and {country} is not "
                    f"{other_country}."))
  os.makedirs(os.path.join(DATA, "cot"), exist_ok=True)
  for dataset, data in (("gsm8k", rows), ("strategyqa", facts)):
    with open(os.path.join(DATA, "cot", f"{dataset}_train.tsv"), "w",
              encoding="utf-8") as f:
      for question, answer, chain in data:
        f.write(f"{question}\t{answer}\t{chain}\n")
  return {q for q, _, _ in rows}


def mmlu(rng):
  def arithmetic_row(a, b):
    right = a * b
    choices = [right, right + a, right - b, right + 1]
    rng.shuffle(choices)
    return [f"What is {a} times {b}?", *map(str, choices),
            "ABCD"[choices.index(right)]]

  def geography_row(country, city):
    others = [k for _, k in rng.sample(CAPITALS, 4) if k != city][:3]
    choices = others + [city]
    rng.shuffle(choices)
    return [f"What is the capital of {country}?", *choices,
            "ABCD"[choices.index(city)]]

  subjects = {
      "elementary_mathematics": [arithmetic_row(a, b) for a, b in
                                 [(rng.randint(2, 12), rng.randint(2, 12))
                                  for _ in range(25)]],
      "high_school_geography": [geography_row(c, k) for c, k in CAPITALS[:25]],
  }
  for subject, rows in subjects.items():
    for folder, part in (("dev", rows[:5]), ("val", rows[5:15]),
                         ("test", rows[15:])):
      path = os.path.join(DATA, "eval", "mmlu", folder, f"{subject}_{folder}.csv")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(part)
    prompt = os.path.join(DATA, "eval", "mmlu", "cot_prompts", f"{subject}.txt")
    os.makedirs(os.path.dirname(prompt), exist_ok=True)
    with open(prompt, "w", encoding="utf-8") as f:
      blocks = []
      for question, a, b, c, d, answer in rows[:5]:
        right = {"A": a, "B": b, "C": c, "D": d}[answer]
        blocks.append(f"Q: {question}\n(A) {a} (B) {b} (C) {c} (D) {d}\nA: Let's "
                      f"think step by step. The correct value is {right}, which is "
                      f"option ({answer}). The answer is ({answer}).")
      f.write("\n\n".join(blocks) + "\n")


def boolean_expression(rng):
  values = [rng.choice(["True", "False"]) for _ in range(3)]
  ops = [rng.choice(["and", "or"]) for _ in range(2)]
  negate = rng.random() < 0.4
  text = f"{'not ' if negate else ''}{values[0]} {ops[0]} {values[1]} {ops[1]} {values[2]}"
  return text, str(eval(text))  # pylint: disable=eval-used  # our own literals


def bbh(rng):
  examples = []
  for _ in range(20):
    text, value = boolean_expression(rng)
    examples.append({"input": f"{text} is", "target": value})
  path = os.path.join(DATA, "eval", "bbh", "boolean_expressions.json")
  os.makedirs(os.path.join(os.path.dirname(path), "cot-prompts"), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump({"examples": examples}, f, indent=1)
  shots = []
  for _ in range(3):
    text, value = boolean_expression(rng)
    shots.append(f"Q: {text} is\nA: Let's think step by step. Python evaluates "
                 f"'not' first, then 'and', then 'or'; the whole expression is "
                 f"{value}. So the answer is {value}.")
  with open(os.path.join(os.path.dirname(path), "cot-prompts",
                         "boolean_expressions.txt"), "w", encoding="utf-8") as f:
    f.write("Evaluate boolean expressions written with True, False, not, and, or."
            "\n\n" + "\n\n".join(shots) + "\n")


def gsm8k(rng, training_questions):
  def record(i):
    while True:
      question, answer, chain = word_problem(rng, NAMES[(i * 5) % len(NAMES)],
                                             ITEMS[(i * 3) % len(ITEMS)])
      if question not in training_questions:
        return {"question": question, "answer": f"{chain}\n#### {answer}"}
  directory = os.path.join(DATA, "eval", "gsm8k")
  write_jsonl(os.path.join(directory, "train.jsonl"), [record(i) for i in range(8)])
  write_jsonl(os.path.join(directory, "test.jsonl"),
              [record(i) for i in range(8, 28)])


def train_vocabulary():
  texts = []
  for folder, _, files in os.walk(DATA):
    for name in sorted(files):
      with open(os.path.join(folder, name), encoding="utf-8") as f:
        texts.append(f.read())
  corpus = os.path.join(HERE, "spm_corpus.txt")
  with open(corpus, "w", encoding="utf-8") as f:
    f.write("\n".join(texts))
  spm.SentencePieceTrainer.train(
      input=corpus, model_prefix=os.path.join(HERE, "sample_spm"), vocab_size=1000,
      model_type="unigram", character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2,
      bos_id=-1, hard_vocab_limit=False, num_threads=1, minloglevel=2)
  os.remove(corpus)
  os.remove(os.path.join(HERE, "sample_spm.vocab"))


def main():
  rng = random.Random(20240611)
  muffin(rng)
  p3(rng)
  niv2(rng)
  training_questions = cot(rng)
  mmlu(rng)
  bbh(rng)
  gsm8k(rng, training_questions)
  train_vocabulary()
  print(f"Wrote the sample data to {DATA} and {HERE}/sample_spm.model")


if __name__ == "__main__":
  main()
