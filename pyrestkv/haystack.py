"""Synthetic long documents for tests and benchmarks: varied filler prose with facts ("needles")
inserted at chosen depths, and a fixed set of needle cases with questions and expected answers."""

import random
from dataclasses import dataclass

TOPICS = ["the harbour", "the old mill", "the river delta", "the mountain pass", "the orchard", "the library",
          "the railway depot", "the salt flats", "the observatory", "the market square", "the glassworks"]
VERBS = ["was repaired", "was surveyed", "was painted", "was measured", "was cleaned", "was inspected",
         "was photographed", "was mapped", "was restored", "was visited"]
WHO = ["a team of students", "the town council", "two engineers", "a travelling botanist", "the night watch",
       "a retired sailor", "the mayor's office", "a group of volunteers", "the local historian"]
DETAILS = ["The work took {n} days.", "Costs came to {n} crowns.", "About {n} people came to watch.",
           "Rain delayed it by {n} hours.", "The report ran to {n} pages.", "It used {n} kilograms of lime.",
           "Nobody had done this for {n} years.", "A plaque now lists {n} names."]


def filler_sentence(rng: random.Random) -> str:
    return (f"In the {rng.choice(['spring', 'summer', 'autumn', 'winter'])} of year {rng.randint(1700, 1990)}, "
            f"{rng.choice(TOPICS)} {rng.choice(VERBS)} by {rng.choice(WHO)}. "
            + rng.choice(DETAILS).format(n=rng.randint(2, 900)))


def make_document(llm, n_tokens: int, facts, seed: int = 0) -> str:
    """About n_tokens of filler (counted with llm's tokenizer), with each (depth, sentence) of
    facts inserted at that fraction of the document."""
    rng = random.Random(seed)
    sentences = []
    total = 0
    while total < n_tokens:
        s = filler_sentence(rng)
        sentences.append(s)
        total += len(llm.tokenize(s.encode(), add_bos=False)) + 1
    for depth, fact in sorted(facts, key=lambda f: f[0], reverse=True):
        sentences.insert(int(round(depth * len(sentences))), fact)
    return " ".join(sentences)


@dataclass(frozen=True)
class NeedleCase:
    fact: str
    question: str
    answer: str  # expected in the model's answer (case-insensitive)
    depth: float  # where the fact sits, as a fraction of the document


NEEDLE_CASES = [
    NeedleCase("The special magic number for the archive room is 5821.",
               "What is the special magic number for the archive room?", "5821", 0.30),
    NeedleCase("Remember this: the name of the lighthouse keeper is Ottoline Varga.",
               "What is the name of the lighthouse keeper?", "Varga", 0.50),
    NeedleCase("Important note: the secret ingredient in the bakery's bread is cardamom.",
               "What is the secret ingredient in the bakery's bread?", "cardamom", 0.70),
    NeedleCase("Important note: the rescue ship was called the Marigold.",
               "What was the rescue ship called?", "Marigold", 0.15),
    NeedleCase("Remember this: the comet was discovered by Professor Aldous Quimby.",
               "Who discovered the comet?", "Quimby", 0.85),
    NeedleCase("Important note: the town festival is always held in October.",
               "In which month is the town festival held?", "October", 0.60),
    NeedleCase("Remember this: the mayor's favourite animal is the red panda.",
               "What is the mayor's favourite animal?", "panda", 0.40),
    NeedleCase("Important note: the old bridge was painted turquoise.",
               "What colour was the old bridge painted?", "turquoise", 0.20),
]


def needle_prompt(document: str, question: str) -> str:
    return f"Document:\n{document}\n\nAnswer the question using the document. Question: {question}"
