"""The demo's training text, generated here: simple English sentences with enough structure to learn."""

import random

SUBJECTS = ["the cat", "a small dog", "my old friend", "the sailor", "every child", "the baker", "a quiet fox",
            "the teacher", "our neighbour", "the red bird"]
VERBS = ["sees", "finds", "carries", "paints", "follows", "remembers", "counts", "watches", "hides", "brings"]
OBJECTS = ["the lantern", "a green apple", "seven stones", "the long road", "a paper boat", "the blue door",
           "three letters", "a warm loaf", "the river", "an empty box"]
ENDINGS = ["at dawn", "in the rain", "before supper", "near the harbour", "every morning", "without a word",
           "under the bridge", "after school", "by the fire", "on monday"]


def training_text(n_sentences=4000, seed=0):
    """n_sentences of 'subject verb object ending.' joined by spaces (about 40 characters each)."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(n_sentences):
        sentence = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}."
        sentences.append(sentence)
    return " ".join(sentences)
