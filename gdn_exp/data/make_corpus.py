"""Writes the shipped tiny corpus, gdn_exp/data/corpus/village_stories.txt: short English paragraphs made from
hand-written templates and word lists (no downloaded text), one document per blank-line-separated paragraph.

    python -m gdn_exp.data.make_corpus          # rewrites the file; the same seed gives the same bytes
    python -m gdn_exp.data.make_corpus --documents 1000000 --out /tmp/stories.txt   # a larger one (~390 MB)
                                                # for task.path=...: throughput runs on a machine without internet

The text is simple but varied (stories, letters, notes on places and recipes), with recurring names and
places across documents, so a small model lowers its perplexity within minutes on a CPU.
"""
import argparse
import random
from pathlib import Path

from gdn_exp.data.lm import CORPUS_PATH

NUM_DOCUMENTS = 800
SEED = 2024

NAMES = ["Mara", "Tobin", "Elsa", "Hugo", "Nell", "Piet", "Ada", "Rowan", "Ilse", "Jonas", "Greta", "Felix",
         "Lena", "Oskar", "Wren", "Bram", "Clara", "Emil", "Hanna", "Milo"]
PRONOUNS = {"Mara": "she", "Tobin": "he", "Elsa": "she", "Hugo": "he", "Nell": "she", "Piet": "he", "Ada": "she",
            "Rowan": "he", "Ilse": "she", "Jonas": "he", "Greta": "she", "Felix": "he", "Lena": "she",
            "Oskar": "he", "Wren": "she", "Bram": "he", "Clara": "she", "Emil": "he", "Hanna": "she", "Milo": "he"}
ROLES = ["baker", "miller", "fisher", "teacher", "carpenter", "weaver", "shepherd", "smith", "gardener",
         "ferryman", "potter", "clockmaker", "beekeeper", "librarian"]
PLACES = ["the old mill", "the harbour", "the market square", "the orchard", "the chapel on the hill",
          "the bridge over the Lune", "the bakery", "the school house", "the forest path", "the lighthouse",
          "the meadow by the river", "the inn at the crossroads", "the library", "the quarry"]
TOWNS = ["Ashford", "Brackwater", "Coldharbour", "Dunmere", "Eastwick", "Fernley", "Greyhaven", "Hollow End"]
OBJECTS = ["a basket of apples", "a lantern", "a wooden box", "a letter", "a loaf of bread", "a small bell",
           "a map of the valley", "a jar of honey", "a broken clock", "a blue scarf", "a fishing net",
           "a bundle of wool", "a brass key", "a book of songs", "a sack of flour"]
WEATHER = ["The morning was cold and clear.", "Rain had fallen all night, and the roads were soft with mud.",
           "A warm wind came up from the south.", "Fog lay over the fields until noon.",
           "It was the first bright day of spring.", "Snow covered the roofs of the town.",
           "The evening was still, and the sky turned gold.", "Clouds gathered over the hills."]
TIMES = ["In the morning", "Before dawn", "At noon", "In the afternoon", "Late in the evening", "On Sunday",
         "At the end of the week", "One autumn day", "Early in the summer", "On the day of the fair"]
FEELINGS = ["glad", "tired", "worried", "curious", "proud", "surprised", "calm", "restless", "grateful"]
ACTIONS = ["mended the fence", "counted the sheep", "swept the floor", "baked two loaves", "read by the fire",
           "fixed the roof", "painted the door", "carried water from the well", "sang an old song",
           "wrote a long letter", "tended the bees", "cleaned the windows", "planted beans",
           "sharpened the tools", "sorted the books"]
FOODS = ["soup", "bread", "pie", "stew", "porridge", "cake", "pancakes", "jam"]
INGREDIENTS = ["flour", "butter", "milk", "two eggs", "a pinch of salt", "honey", "apples", "onions", "carrots",
               "barley", "oats", "plums", "sugar", "potatoes", "leeks"]
STEPS = ["Mix the {a} with the {b}.", "Warm the {a} slowly over a low fire.", "Add the {a} and stir well.",
         "Leave the {a} to rest for an hour.", "Cut the {a} into small pieces.", "Pour in the {a} a little at a time.",
         "Bake until the top is brown.", "Let it cool before serving.", "Season with {a} to taste."]


def person(rng):
    name = rng.choice(NAMES)
    return name, PRONOUNS[name], rng.choice(ROLES)


def story(rng):
    (a, a_pron, a_role), (b, _, b_role) = person(rng), person(rng)
    place, obj, town = rng.choice(PLACES), rng.choice(OBJECTS), rng.choice(TOWNS)
    sentences = [
        f"{rng.choice(TIMES)}, {a} the {a_role} walked to {place} in {town}.", rng.choice(WEATHER),
        f"{a_pron.capitalize()} carried {obj}, because {b} the {b_role} had asked for it.",
        f"On the way, {a} met {rng.choice(NAMES)}, who {rng.choice(ACTIONS)} and then went home.",
        f"When {a} reached {place}, {b} was waiting there and looked {rng.choice(FEELINGS)}.",
        f"\"Thank you for {obj},\" said {b}. \"I did not think you would come so soon.\"",
        f"They talked for a while about {rng.choice(TOWNS)} and the {rng.choice(ROLES)} who lived there.",
        f"Afterwards {a} {rng.choice(ACTIONS)}, and {b} {rng.choice(ACTIONS)}.",
        f"By the time {a} returned, {a_pron} felt {rng.choice(FEELINGS)}, and the day was nearly over.",
    ]
    keep = sorted(rng.sample(range(2, len(sentences) - 1), rng.randint(3, 5)))
    return " ".join([sentences[0], sentences[1], *(sentences[i] for i in keep), sentences[-1]])


def letter(rng):
    (a, _, a_role), (b, _, _) = person(rng), person(rng)
    town = rng.choice(TOWNS)
    lines = [f"Dear {b},", f"I am writing to you from {town}, where I now work as a {a_role}.",
             rng.choice(WEATHER), f"Yesterday I {rng.choice(ACTIONS)} and later I {rng.choice(ACTIONS)}.",
             f"Do you remember {rng.choice(PLACES)}? I walked past it and thought of you.",
             f"Please send {rng.choice(OBJECTS)} if you can; I will repay you when I visit.",
             f"I hope you are {rng.choice(FEELINGS)} and well.", f"With love, {a}"]
    return " ".join(lines[:3] + rng.sample(lines[3:-2], 2) + lines[-2:])


def place_note(rng):
    town, place = rng.choice(TOWNS), rng.choice(PLACES)
    name, _, role = person(rng)
    years = rng.randint(3, 90)
    return (f"{town} is a small town with {rng.randint(2, 40) * 25} people. Its best known place is {place}, "
            f"which is {years} years old. The {role} there is {name}, and every visitor is told to see "
            f"{rng.choice(PLACES)} as well. {rng.choice(WEATHER)} On market days people bring {rng.choice(FOODS)} "
            f"and {rng.choice(OBJECTS)} to sell.")


def recipe(rng):
    food = rng.choice(FOODS)
    ingredients = rng.sample(INGREDIENTS, rng.randint(3, 5))
    steps = [step.format(a=rng.choice(ingredients), b=rng.choice(ingredients))
             for step in rng.sample(STEPS, rng.randint(3, 5))]
    return (f"How to make {food} the way they do in {rng.choice(TOWNS)}. You will need "
            f"{', '.join(ingredients[:-1])} and {ingredients[-1]}. " + " ".join(steps) +
            f" {rng.choice(NAMES)} says it tastes best with {rng.choice(FOODS)}.")


def documents(num_documents: int, seed: int = SEED):
    """num_documents paragraphs (stories are three times as common as each other kind), one at a time."""
    rng = random.Random(seed)
    kinds = [story, story, story, letter, place_note, recipe]
    for _ in range(num_documents):
        yield rng.choice(kinds)(rng)


def corpus_text() -> str:
    """The whole shipped corpus: NUM_DOCUMENTS paragraphs separated by blank lines."""
    return "\n\n".join(documents(NUM_DOCUMENTS)) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=int, default=NUM_DOCUMENTS, help="how many paragraphs")
    parser.add_argument("--out", type=Path, default=CORPUS_PATH, help="the file to write (default: the shipped one)")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as file:  # a paragraph at a time: a large corpus is never held in memory
        for i, document in enumerate(documents(args.documents, args.seed)):
            file.write(("\n\n" if i else "") + document)
        file.write("\n")
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes, {args.documents:,} documents)")


if __name__ == "__main__":
    main()
