"""Long test documents: varied filler prose with facts inserted at chosen depths."""

import random

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
