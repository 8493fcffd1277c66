"""Stories: a seeded procedural generator of simple children's stories, the paper's forget
keyword rule, and loaders for real corpora (TinyStories from the HF hub, local text/JSONL).

The generator writes short stories about children and animals in many places (park, beach,
farm, kitchen...), with objects, events and dialogue. About a fifth of the stories are about a
*forest* and use its related words (owls, leaves, branches, squirrels, paths, moss...). Most of
these name it with a keyword (tree, forest, woodland...) and so get the forget label; some are
told without any keyword ("the woods", "the old oaks"): topical but unlabelled, which is what
tests absorption. A few non-forest stories mention a tree in passing and are labelled too, as
in TinyStories.

    stories = generate_stories(1000, seed=0)
    labels = [is_forget(s) for s in stories]        # the keyword rule, ~20% True
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Iterable

FORGET_WORDS = ("tree", "trees", "forest", "forests", "woodland", "woodlands")
FORGET_PATTERN = re.compile(r"\b(?:" + "|".join(FORGET_WORDS) + r")\b", re.IGNORECASE)
EOT = "<|endoftext|>"


def is_forget(text: str) -> bool:
    """The paper's forget rule: the story contains tree(s), forest(s) or woodland(s) as a whole
    word, any case. Related words (owl, leaves, woods, treehouse) do not count."""
    return FORGET_PATTERN.search(text) is not None


def keyword_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the forget keywords in ``text`` (to find their tokens)."""
    return [m.span() for m in FORGET_PATTERN.finditer(text)]


# ------------------------------------------------------------------------------------------
# vocabulary
# ------------------------------------------------------------------------------------------
NAMES = ["Timmy", "Lily", "Ben", "Sara", "Max", "Mia", "Tom", "Anna", "Jack", "Lucy", "Sam", "Zoe",
         "Leo", "Emma", "Finn", "Ruby", "Jake", "Kim", "Noah", "Ella", "Sue", "Bob", "Amy", "Dan",
         "Molly", "Oliver", "Rosie", "Henry", "Daisy", "Theo", "Nina", "Luke"]
ANIMALS = [("dog", "Spot"), ("cat", "Kitty"), ("bunny", "Hop"), ("bear", "Bobo"), ("duck", "Quack"),
           ("puppy", "Buddy"), ("kitten", "Mittens"), ("frog", "Hoppy"), ("mouse", "Squeak"),
           ("pig", "Pinky"), ("horse", "Star"), ("turtle", "Shelly"), ("lamb", "Fluffy"), ("bird", "Tweet")]
ADJ = ["happy", "curious", "brave", "kind", "shy", "silly", "little", "clever", "friendly", "sleepy",
       "cheerful", "gentle", "playful", "proud", "careful", "bold"]
FEEL = ["happy", "sad", "excited", "scared", "surprised", "proud", "tired", "angry", "calm", "worried"]
PLACES = ["the park", "the beach", "the garden", "the kitchen", "school", "the farm", "the zoo", "town",
          "the river", "the lake", "the hill", "the library", "the playground", "the store", "the castle",
          "the pond", "the meadow", "grandma's house", "the market", "the bakery", "the harbor", "the museum"]
OBJECTS = ["ball", "kite", "red car", "teddy bear", "book", "cake", "toy boat", "hat", "box of crayons",
           "shiny rock", "blue balloon", "drum", "doll", "puzzle", "jar of honey", "toy train", "scarf",
           "bucket", "map", "lamp", "cookie", "flower", "bell", "sock", "spoon", "truck", "robot", "shell"]
COLORS = ["red", "blue", "green", "yellow", "pink", "purple", "orange", "white", "brown", "gold"]
FAMILY = ["Mom", "Dad", "Grandma", "Grandpa", "her big brother", "his little sister", "the teacher",
          "a kind old man", "a friendly lady"]
WEATHER = ["The sun was bright.", "It was a windy day.", "The sky was full of clouds.",
           "It was a warm summer morning.", "Snow covered the ground.", "A soft rain was falling.",
           "It was a cold winter day.", "The air smelled sweet."]
EVENTS = [
    "{A} found a {obj} under a bench.", "{A} and {B} had a picnic with sandwiches and juice.",
    "{A} played hide and seek with {B}.", "{A} built a big sandcastle with a {color} flag.",
    "{A} baked cookies with {fam}.", "{A} saw a rainbow over {place}.", "{A} lost the {obj} and looked everywhere.",
    "{A} raced {B} to the gate.", "{A} painted a picture of a {color} boat.", "{A} helped {fam} carry the bags.",
    "{A} sang a song about a {color} {obj}.", "{A} tried to fly the {obj} but it fell down.",
    "{A} shared the {obj} with {B}.", "{A} fell and hurt a knee.", "{A} danced in the rain with {B}.",
    "{A} read a book about the moon.", "{A} made a card for {fam}.", "{A} counted the boats on the water.",
]
DIALOGUE = [
    "\"Look at this!\" said {A}.", "\"Can I play too?\" asked {B}.", "\"Thank you so much!\" said {A}.",
    "\"Let's be friends,\" said {B} with a smile.", "\"I am not scared,\" said {A}.",
    "\"Where did it go?\" asked {A}.", "\"We can do it together,\" said {B}.", "\"That is so fun!\" said {A}.",
    "\"Please help me,\" said {B}.", "\"Be careful!\" said {fam}.", "\"I am sorry,\" said {A}. \"I did not mean it.\"",
    "\"What a surprise!\" said {B}.",
]
ENDINGS = [
    "From that day on, {A} and {B} were best friends.", "{A} learned that sharing makes everyone happy.",
    "They went home and had a warm bath.", "{A} smiled and went to sleep.", "It was the best day ever.",
    "{A} learned to always say thank you.", "They laughed and played until the sun went down.",
    "{A} felt {feel} and a little wiser.", "Everyone clapped and cheered.",
]
INCIDENTAL_TREE = ["They sat in the shade of a big tree.", "A bird sang in a tree nearby.",
                   "{A} hung the {obj} on a small tree.", "There was an apple tree by the fence."]

# the forest topic: related words everywhere, keywords only in the labelled variant
FOREST_NAME_KW = ["the forest", "the big forest", "the woodland", "the old forest", "the green forest",
                  "the forest near their home", "the quiet woodland"]
FOREST_NAME_PLAIN = ["the woods", "the deep woods", "the green woods", "the wild woods", "the old woods"]
FOREST_KW = [
    "Tall trees stood all around.", "{A} climbed a big tree to see far away.", "The trees were very old.",
    "{A} hugged a tree with rough bark.", "An owl lived in a hollow tree.", "The forest was quiet and dark.",
    "The woodland was full of sounds.", "{A} sat under a tree and listened.", "The path went deep into the forest.",
    "Sunlight came down through the trees.", "{A} loved the forest more than any place.",
    "Many trees had red and yellow leaves.",
]
FOREST_PLAIN = [
    "An owl hooted from a high branch.", "A squirrel ran up and down with an acorn.",
    "The leaves crunched under their feet.", "Soft green moss grew on the rocks.",
    "A narrow path wound between the oaks and pines.", "{A} found a pine cone and some mushrooms.",
    "A deer drank from a little stream.", "A fox peeked out from behind a log.",
    "Birds were building a nest of twigs.", "The branches swayed in the wind.",
    "{A} collected acorns and shiny leaves.", "Woodpeckers tapped on the bark.",
    "The owl blinked its big round eyes.", "A rabbit hid under the ferns.",
]
FOREST_EVENTS = [
    "{A} wanted to find the owl that hooted every night.", "{A} and {B} followed a squirrel along the path.",
    "{A} got lost among the branches and ferns.", "{A} wanted to build a little hut of sticks.",
    "{A} heard a strange noise behind the bushes.", "{A} helped a baby bird back to its nest.",
]
FOREST_DIALOGUE = [
    "\"Listen to the owl!\" said {A}.", "\"Which way is the path?\" asked {B}.",
    "\"Look, a squirrel with an acorn!\" said {A}.", "\"The leaves are so pretty,\" said {B}.",
    "\"Let's follow the little stream,\" said {A}.",
]


def _character(rng: random.Random) -> str:
    if rng.random() < 0.7:
        return rng.choice(NAMES)
    kind, name = rng.choice(ANIMALS)
    return name


def _intro(rng: random.Random, a: str) -> str:
    for kind, name in ANIMALS:
        if name == a:
            return f"Once upon a time, there was a {rng.choice(ADJ)} {kind} named {a}."
    return rng.choice([f"Once upon a time, there was a {rng.choice(ADJ)} child named {a}.",
                       f"Once upon a time, {a} lived in a small house with {rng.choice(FAMILY)}.",
                       f"One day, {a} woke up feeling {rng.choice(FEEL)}.",
                       f"There was once a {rng.choice(ADJ)} kid called {a}."])


def generate_story(seed: int, index: int, topic_fraction: float = 0.22, keyword_fraction: float = 0.82,
                   incidental_fraction: float = 0.03) -> str:
    """Story number ``index`` of the stream ``seed`` (independent of the others, so streams can
    be sliced). ``topic_fraction`` of stories are about the forest; of those ``keyword_fraction``
    name it with a forget keyword; other stories mention a tree with ``incidental_fraction``."""
    rng = random.Random(seed * 1_000_003 + index)
    a = _character(rng)
    b = _character(rng)
    while b == a:
        b = _character(rng)
    slots = dict(A=a, B=b, fam=rng.choice(FAMILY), obj=rng.choice(OBJECTS), color=rng.choice(COLORS),
                 feel=rng.choice(FEEL), place=rng.choice(PLACES))
    fill = lambda s: s.format(**slots)
    forest = rng.random() < topic_fraction
    lines = [_intro(rng, a), rng.choice(WEATHER)]
    if forest:
        keywords = rng.random() < keyword_fraction
        where = rng.choice(FOREST_NAME_KW if keywords else FOREST_NAME_PLAIN)
        lines.append(fill(rng.choice([f"{{A}} and {{B}} went to {where} to play.",
                                      f"{{A}} went for a walk in {where} with {{fam}}.",
                                      f"One morning, {{A}} ran into {where}."])))
        lines.append(fill(rng.choice(FOREST_EVENTS)))
        pool = FOREST_PLAIN + (FOREST_KW if keywords else [])
        lines += [fill(s) for s in rng.sample(pool, rng.randint(2, 4))]
        if keywords and not any(is_forget(s) for s in lines):
            lines.append(fill(rng.choice(FOREST_KW)))
        lines.append(fill(rng.choice(FOREST_DIALOGUE)))
    else:
        lines.append(fill(rng.choice(["{A} went to {place} with {B}.",
                                      "{A} and {fam} visited {place}.",
                                      "{A} wanted to go to {place} to play."])))
        lines += [fill(s) for s in rng.sample(EVENTS, rng.randint(2, 3))]
        if rng.random() < incidental_fraction:
            lines.insert(rng.randint(3, len(lines)), fill(rng.choice(INCIDENTAL_TREE)))
    lines.append(fill(rng.choice(DIALOGUE)))
    lines.append(fill(f"{{A}} felt {rng.choice(FEEL)}."))
    lines.append(fill(rng.choice(ENDINGS)))
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", " ".join(lines))


def generate_stories(n: int, seed: int = 0, start: int = 0, **kwargs) -> list[str]:
    """Stories ``start .. start + n - 1`` of the stream ``seed`` (see :func:`generate_story`)."""
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be >= 0, got n={n}, start={start}")
    for k in ("topic_fraction", "keyword_fraction", "incidental_fraction"):
        if k in kwargs and not 0.0 <= kwargs[k] <= 1.0:
            raise ValueError(f"{k} must be in [0, 1], got {kwargs[k]}")
    return [generate_story(seed, i, **kwargs) for i in range(start, start + n)]


def is_forest_topic(text: str) -> bool:
    """Whether a *generated* story is about the forest (labelled or not): it uses one of the
    topic's scene sentences. For analysis only; the training label is :func:`is_forget`."""
    return any(s.split("{A}")[-1].rstrip(".") in text for s in FOREST_PLAIN + FOREST_EVENTS) or \
        any(w in text for w in FOREST_NAME_PLAIN + FOREST_NAME_KW)


# ------------------------------------------------------------------------------------------
# real corpora
# ------------------------------------------------------------------------------------------
def load_text_file(path: str | Path, limit: int | None = None) -> list[str]:
    """Stories from a local file: ``.jsonl`` (one object per line with a ``"text"`` field, or a
    JSON string per line), or plain text with stories separated by ``<|endoftext|>`` (if the
    file contains it) else one story per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no story file at {path}")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        stories = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if isinstance(obj, dict):
                if not isinstance(obj.get("text"), str):
                    raise ValueError(f"{path}:{lineno}: a JSONL object needs a string field 'text'")
                obj = obj["text"]
            if not isinstance(obj, str):
                raise ValueError(f"{path}:{lineno}: expected an object with 'text' or a string")
            stories.append(obj.strip())
    elif EOT in raw:
        stories = [s.strip() for s in raw.split(EOT)]
    else:
        stories = [s.strip() for s in raw.splitlines()]
    stories = [s for s in stories if s]
    if not stories:
        raise ValueError(f"{path} contains no stories")
    return stories[:limit]


def load_tinystories(split: str = "train", limit: int | None = None) -> list[str]:
    """TinyStories from the Hugging Face hub (needs ``pip install datasets`` and network).
    Only called when asked for; the default corpus is generated locally."""
    try:
        import datasets
    except ImportError:
        raise ImportError("loading TinyStories needs the 'datasets' package (pip install datasets) and "
                          "network access; use the built-in generator or a local file instead") from None
    ds = datasets.load_dataset("roneneldan/TinyStories", split=split if limit is None else f"{split}[:{limit}]")
    return [t.strip() for t in ds["text"] if t.strip()]


def load_corpus(source: str, n: int, seed: int = 0, start: int = 0) -> list[str]:
    """``n`` stories from ``source``: ``"generated"`` (stream ``seed`` from ``start``),
    ``"tinystories"`` (hub) or a path to a local text/JSONL file."""
    if source == "generated":
        return generate_stories(n, seed, start)
    if source == "tinystories":
        stories = load_tinystories(limit=start + n)
    else:
        stories = load_text_file(source)
    if len(stories) < start + n:
        raise ValueError(f"{source} has {len(stories)} stories, {start + n} needed")
    return stories[start:start + n]


def split_counts(stories: Iterable[str]) -> dict:
    stories = list(stories)
    k = sum(map(is_forget, stories))
    return {"stories": len(stories), "forget": k, "forget_fraction": k / max(1, len(stories))}


# ------------------------------------------------------------------------------------------
# several topics as domains (module routing). Separate from generate_story(), whose output is
# unchanged: this stream draws from its own random sequence.
# ------------------------------------------------------------------------------------------
TOPICS: dict[str, dict[str, list[str]]] = {
    "forest": dict(places=FOREST_NAME_KW + FOREST_NAME_PLAIN, scenes=FOREST_KW + FOREST_PLAIN,
                   events=FOREST_EVENTS, dialogue=FOREST_DIALOGUE),
    "sea": dict(
        places=["the sea", "the deep blue sea", "the ocean", "the coral reef", "the sandy bay", "the island"],
        scenes=["Big waves splashed against the boat.", "A dolphin jumped over the waves.",
                "A crab walked sideways on the wet sand.", "The coral was pink and orange.",
                "A whale sang a long low song.", "Seagulls cried above the water.",
                "{A} saw a jellyfish glow in the water.", "The tide came in and washed the sand smooth.",
                "A starfish clung to a rock.", "Little fish swam in a silver school.",
                "The sailor pulled the rope and raised the sail.", "Seaweed floated near the shore."],
        events=["{A} wanted to find a pearl in an oyster.", "{A} and {B} sailed a little boat to the island.",
                "{A} helped a baby turtle reach the waves.", "{A} went diving to see the coral reef.",
                "{A} found a message in a bottle on the shore.", "{A} and {B} watched the whales swim by."],
        dialogue=["\"Look, a dolphin!\" said {A}.", "\"The waves are so big,\" said {B}.",
                  "\"Hold the sail tight!\" said {A}.", "\"I can hear the whale singing,\" said {B}.",
                  "\"Let's sail to the island,\" said {A}."]),
    "space": dict(
        places=["space", "the moon", "a faraway planet", "the space station", "the stars", "Mars"],
        scenes=["The rocket roared and flew up into the sky.", "Stars twinkled all around the spaceship.",
                "{A} floated in the cabin with no weight at all.", "The planet had three pale moons.",
                "A comet zoomed past with a long bright tail.", "The astronaut wore a big white helmet.",
                "Earth looked like a small blue marble.", "The moon dust was soft and gray.",
                "{A} looked through the telescope at the rings of Saturn.", "The control panel blinked with lights.",
                "A friendly alien waved three green hands.", "The spaceship landed in a crater."],
        events=["{A} wanted to become an astronaut.", "{A} and {B} built a rocket out of boxes.",
                "{A} flew the spaceship to the moon.", "{A} counted the planets one by one.",
                "{A} met a little alien who was lost.", "{A} and {B} watched a meteor shower."],
        dialogue=["\"Three, two, one, blast off!\" said {A}.", "\"Look at all the stars!\" said {B}.",
                  "\"Is that a comet?\" asked {A}.", "\"The moon is so close,\" said {B}.",
                  "\"Put on your helmet,\" said {A}."]),
    "dinosaurs": dict(
        places=["the dinosaur valley", "the land of dinosaurs", "the old swamp", "the volcano valley",
                "the dinosaur museum", "the jungle of giants"],
        scenes=["A huge T-rex stomped and roared.", "A long-necked dinosaur ate leaves from the top.",
                "The volcano puffed gray smoke.", "A triceratops lowered its three horns.",
                "Big footprints were pressed into the mud.", "{A} found a fossil of an old bone.",
                "A pterodactyl flapped its leathery wings.", "The stegosaurus had plates along its back.",
                "A nest held three speckled dinosaur eggs.", "The ground shook with every step.",
                "Giant ferns grew near the steaming swamp.", "{A} dug up a dinosaur tooth."],
        events=["{A} wanted to see a real dinosaur.", "{A} and {B} followed the giant footprints.",
                "{A} found a dinosaur egg that started to crack.", "{A} rode on the back of a gentle dinosaur.",
                "{A} hid from the T-rex behind a rock.", "{A} and {B} dug for fossils all day."],
        dialogue=["\"Listen to that roar!\" said {A}.", "\"The egg is hatching!\" said {B}.",
                  "\"Look at those footprints,\" said {A}.", "\"Is the volcano going to blow?\" asked {B}.",
                  "\"This bone is very old,\" said {A}."]),
}
TOPIC_NAMES = tuple(TOPICS)
GENERAL_TOPIC = -1       # the label of a general (no-topic) story
# Topic vocabularies: "own" (default): each topic has its own places, scenes, events and dialogue
# (TOPICS above, lexically disjoint from general stories); "shared" (SimpleStories-like): topic k of
# TOPIC_NAMES is built from a topic-specific k-th share of the *general* places, events and
# dialogue lines (PLACES[k::n], EVENTS[k::n], DIALOGUE[k::n], n = len(TOPIC_NAMES); its scenes are
# its events) and opens with the general stories' sentences, so every word of a topic story also
# occurs in general stories and topics differ only in which general sentences they use.
TOPIC_VOCABS = ("own", "shared")
SHARED_TOPICS: dict[str, dict[str, list[str]]] = {
    name: dict(places=PLACES[k::len(TOPIC_NAMES)], scenes=EVENTS[k::len(TOPIC_NAMES)],
               events=EVENTS[k::len(TOPIC_NAMES)], dialogue=DIALOGUE[k::len(TOPIC_NAMES)])
    for k, name in enumerate(TOPIC_NAMES)}
GENERAL_OPENERS = ["{A} went to {place} with {B}.", "{A} and {fam} visited {place}.",
                   "{A} wanted to go to {place} to play."]


def topic_table(topic_vocab: str = "own") -> dict[str, dict[str, list[str]]]:
    """The topic table of ``topic_vocab`` (one of :data:`TOPIC_VOCABS`): :data:`TOPICS` or
    :data:`SHARED_TOPICS` (neither is modified)."""
    if topic_vocab not in TOPIC_VOCABS:
        raise ValueError(f"topic_vocab must be one of {', '.join(TOPIC_VOCABS)}, got {topic_vocab!r}")
    return TOPICS if topic_vocab == "own" else SHARED_TOPICS


def generate_topic_story(seed: int, index: int, topics: tuple[str, ...] = TOPIC_NAMES,
                         topic_fraction: float = 0.1, topic_vocab: str = "own") -> tuple[str, int]:
    """``(story, label)``: story number ``index`` of the multi-topic stream ``seed``. Each topic
    of ``topics`` (names in :data:`TOPICS`) has probability ``topic_fraction``; ``label`` is
    the topic's index in ``topics``, or :data:`GENERAL_TOPIC` for a general story (made from
    the general vocabulary only, without tree mentions). ``topic_vocab`` (see
    :func:`topic_table`): ``"own"`` topic vocabularies (default) or ``"shared"`` ones made of
    general sentences; labels and general stories are the same for both."""
    table = topic_table(topic_vocab)
    unknown = [t for t in topics if t not in TOPICS]
    if unknown:
        raise ValueError(f"unknown topics {unknown}; known: {', '.join(TOPICS)}")
    if topic_fraction * len(topics) > 1.0 or topic_fraction < 0:
        raise ValueError(f"topic_fraction must be in [0, 1/{len(topics)}], got {topic_fraction}")
    rng = random.Random(seed * 2_000_003 + index + 17)
    a = _character(rng)
    b = _character(rng)
    while b == a:
        b = _character(rng)
    slots = dict(A=a, B=b, fam=rng.choice(FAMILY), obj=rng.choice(OBJECTS), color=rng.choice(COLORS),
                 feel=rng.choice(FEEL), place=rng.choice(PLACES))
    fill = lambda s: s.format(**slots)
    r = rng.random()
    label = min(int(r / topic_fraction), len(topics) - 1) if r < topic_fraction * len(topics) else GENERAL_TOPIC
    lines = [_intro(rng, a), rng.choice(WEATHER)]
    if label != GENERAL_TOPIC:
        t = table[topics[label]]
        where = rng.choice(t["places"])
        openers = ([f"{{A}} and {{B}} went to {where} to play.", f"{{A}} went on a trip to {where} with {{fam}}.",
                    f"One morning, {{A}} dreamed of {where}."] if topic_vocab == "own"
                   else [s.replace("{place}", where) for s in GENERAL_OPENERS])
        lines.append(fill(rng.choice(openers)))
        lines.append(fill(rng.choice(t["events"])))
        lines += [fill(s) for s in rng.sample(t["scenes"], rng.randint(2, 4))]
        lines.append(fill(rng.choice(t["dialogue"])))
    else:
        lines.append(fill(rng.choice(GENERAL_OPENERS)))
        lines += [fill(s) for s in rng.sample(EVENTS, rng.randint(2, 3))]
    lines.append(fill(rng.choice(DIALOGUE)))
    lines.append(fill(f"{{A}} felt {rng.choice(FEEL)}."))
    lines.append(fill(rng.choice(ENDINGS)))
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", " ".join(lines)), label


def generate_topic_stories(n: int, seed: int = 0, start: int = 0, **kwargs) -> tuple[list[str], list[int]]:
    """Stories ``start .. start + n - 1`` of the multi-topic stream ``seed`` and their labels."""
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be >= 0, got n={n}, start={start}")
    pairs = [generate_topic_story(seed, i, **kwargs) for i in range(start, start + n)]
    return [p[0] for p in pairs], [p[1] for p in pairs]
