"""The offline text-classification task family: English sentences made by a small grammar.

No text data set ships offline, so the project writes its own: each family has a grammar
(templates whose slots are filled from phrase lists) and each task labels the sentences along
one attribute. Related tasks share labels, so a run with one task per client is non-IID while a
global classifier can still serve every client (a label means the same thing in every task), and
zero-shot adapter generation has seen siblings of each held-out task:

- ``topic``: the subject of a news sentence, six topics in overlapping label sets
  (``text-topic-news`` with four, ``-health``, ``-culture``, ``-markets``, ``-gallery``,
  ``-fitness``; held out ``-leisure`` and ``-policy``, every label of which some seen task has);
- ``sentiment``: positive or negative reviews of products, films and (held out) restaurants:
  the same labels in different domain vocabulary;
- ``intent``: what a customer message wants (question, complaint, request, praise) in a shop and
  in travel bookings (held out: all four intents in travel, praise seen only in the shop).

A label is carried by many paraphrases, and greetings, places, dates and remarks are shared by
every label as distractors, so no single keyword decides the label but the sentence does: a
pretrained encoder helps, and a bag-of-one-word rule does not suffice.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from fedlora.core.records import TextExample, by_name

Rules = Mapping[str, tuple[str, ...]]

_SLOT = re.compile(r"\{(\w+)\}")
_SENTENCE_START = re.compile(r"(^|[.!?]\s+)([a-z])")
_MAX_DEPTH = 8


@dataclass(frozen=True)
class Grammar:
    """Templates and phrase lists; ``s`` is the start symbol.

    A slot is looked up in the label's own rules first and in the shared ``rules`` next, so the
    label-bearing slots (a sports action, a complaint) and the distractor slots (a date, a
    greeting) live side by side in one template.
    """

    rules: Rules
    by_label: Mapping[str, Rules]

    def sentence(self, rng: random.Random, label: str) -> str:
        """One sentence carrying ``label``; deterministic in the state of ``rng``."""
        own = self.by_label[label]

        def expand(text: str, depth: int) -> str:
            if depth > _MAX_DEPTH:
                raise ValueError(f"grammar slots nest deeper than {_MAX_DEPTH} in {text!r}: a rule refers to itself")

            def fill(match: re.Match[str]) -> str:
                slot = match.group(1)
                choices = own.get(slot) or self.rules.get(slot)
                if not choices:
                    raise KeyError(f"slot {{{slot}}} has no phrases for label {label!r}; add it to the grammar")
                return expand(rng.choice(choices), depth + 1)

            return _SLOT.sub(fill, text)

        return _tidy(expand("{s}", 0))


def _tidy(text: str) -> str:
    """Collapse the spaces empty slots leave behind and capitalise each sentence."""
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([,.;?!])", r"\1", text)
    return _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), text)


@dataclass(frozen=True, kw_only=True)
class TextTask:
    """One text-classification task: which labels it uses and the grammar that writes its texts."""

    name: str  # e.g. "text-sentiment-movie"; the "text-" prefix keeps it apart from the procedural tasks
    family: str  # e.g. "sentiment"
    kind: str = "seq-cls"
    labels: tuple[str, ...]
    descriptions: tuple[str, ...]  # natural-language descriptions of the task
    held_out: bool
    grammar: Grammar = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"task {self.name!r} needs two or more distinct labels, got {self.labels}")
        missing = [label for label in self.labels if label not in self.grammar.by_label]
        if missing:
            raise ValueError(f"task {self.name!r}: its grammar writes no sentences for labels {missing}")

    def _stream(self, rng: random.Random) -> Iterator[TextExample]:
        """Endless examples, the labels in shuffled blocks so every prefix is nearly balanced."""
        while True:
            for label in rng.sample(self.labels, len(self.labels)):
                yield TextExample(text=self.grammar.sentence(rng, label), label=label)

    def examples(self, n: int, seed: int, split: str = "train", tagged: bool = False) -> list[TextExample]:
        """``n`` examples, deterministic in (task, seed, split).

        Train and test draw from independent streams, and test texts that also occur in the first
        ``4 * n`` train texts of the same seed are skipped, so a test set never overlaps training.
        ``tagged`` is accepted so callers treat this suite like the procedural one; a
        classification record has no prompt to tag.
        """
        del tagged
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        rng = random.Random(f"{self.name}|{seed}|{split}")
        if split == "train":
            return list(islice(self._stream(rng), n))
        seen = {e.text for e in self.examples(4 * n, seed, "train")}
        fresh = (e for e in islice(self._stream(rng), 100 * n) if e.text not in seen)
        return list(islice(fresh, n))


def label_space(tasks: Sequence[TextTask | Any]) -> tuple[str, ...]:
    """The ordered union of the tasks' labels, first appearance first: a run's classifier outputs."""
    return tuple(dict.fromkeys(label for task in tasks for label in task.labels))


# --- topic: news sentences -------------------------------------------------------------------

_TOPIC_SHARED: Rules = {
    "s": (
        "{frame}{subj} {act} {where} {when}.",
        "{subj} {act} {when}, {comment}.",
        "{when} {where}, {subj} {act}.",
        "{frame}{subj} {act}, {comment}.",
        "{frame}{anyone} said that {subj} {act} {when}.",
        "{subj} {act} {where}. {follow}.",
    ),
    "frame": ("", "", "reports say that ", "according to local media, ", "as expected, ", "in a surprise move, "),
    "anyone": ("a spokesperson", "officials", "the organisers", "a local reporter", "several witnesses"),
    "where": ("", "in Chicago", "in Madrid", "in the capital", "across the region", "in Osaka", "in Nairobi"),
    "when": ("on Monday", "last week", "this morning", "on Friday evening", "earlier this year", "yesterday"),
    "comment": (
        "a decision that surprised many observers",
        "and more details are expected later this week",
        "although some critics remain sceptical",
        "which made the headlines across the country",
        "according to a statement released at noon",
    ),
    "follow": (
        "More details are expected soon",
        "Critics were quick to respond",
        "The news spread quickly on social media",
        "Nobody had predicted it a year ago",
    ),
}

_TOPICS: Mapping[str, Rules] = {
    "sports": {
        "subj": (
            "the home team",
            "the striker",
            "a veteran goalkeeper",
            "the head coach",
            "the marathon runner",
            "the tennis champion",
            "the national rugby squad",
            "the young sprinter",
            "the basketball club",
            "the cycling team",
        ),
        "act": (
            "won the championship final",
            "scored twice in the second half",
            "broke the world record in the 400 metres",
            "lost the match after extra time",
            "signed a three-year contract with a rival club",
            "was injured during training",
            "qualified for the Olympic Games",
            "defended the title in straight sets",
            "finished the season at the top of the league",
            "missed a penalty in the final minute",
        ),
    },
    "science": {
        "subj": (
            "astronomers",
            "a team of physicists",
            "the research team",
            "marine biologists",
            "chemists at the university",
            "the space agency",
            "geologists",
            "a group of climate scientists",
            "the national laboratory",
            "researchers",
        ),
        "act": (
            "discovered a new species of deep-sea fish",
            "observed a distant galaxy with a new telescope",
            "published a study on quantum particles",
            "measured the fastest chemical reaction ever recorded",
            "launched a probe towards Jupiter",
            "found evidence of ancient water on Mars",
            "sequenced the genome of a rare plant",
            "built a more precise atomic clock",
            "detected gravitational waves from colliding stars",
            "mapped the ocean floor with underwater robots",
        ),
    },
    "business": {
        "subj": (
            "the retail giant",
            "a tech startup",
            "the airline",
            "the car maker",
            "the chief executive",
            "the oil company",
            "a small family firm",
            "the biggest supermarket chain",
            "the software company",
            "the steel producer",
        ),
        "act": (
            "reported record profits for the quarter",
            "announced plans to cut two thousand jobs",
            "raised fifty million dollars in new funding",
            "agreed to buy a rival company",
            "saw the share price fall sharply",
            "opened three new factories",
            "lowered the sales forecast for next year",
            "prepared to list on the stock exchange",
            "cut prices to win back customers",
            "signed a major supply deal with a retailer",
        ),
    },
    "politics": {
        "subj": (
            "the prime minister",
            "the opposition party",
            "parliament",
            "the senator",
            "the governor",
            "the president",
            "the city council",
            "the foreign minister",
            "a group of lawmakers",
            "the ruling coalition",
        ),
        "act": (
            "passed a new law on immigration",
            "called for an early election",
            "won the vote by a narrow margin",
            "announced a cabinet reshuffle",
            "rejected the proposed budget",
            "signed a peace agreement with the neighbouring country",
            "promised to lower taxes before the campaign",
            "launched an inquiry into corruption",
            "held talks with union leaders about reform",
            "resigned after a long scandal",
        ),
    },
    "health": {
        "subj": (
            "doctors",
            "the hospital",
            "nurses at the clinic",
            "the health ministry",
            "a team of surgeons",
            "public health officials",
            "the family doctor",
            "the children's hospital",
            "the medical association",
            "dentists",
        ),
        "act": (
            "warned about a rise in flu cases this winter",
            "recommended more exercise to lower blood pressure",
            "began offering free vaccinations to children",
            "reported fewer heart attacks among older adults",
            "urged people to drink more water during the heatwave",
            "opened a new ward for cancer patients",
            "tested a cheaper treatment for diabetes",
            "reduced waiting times for surgery",
            "launched a campaign against smoking",
            "advised patients to get more sleep",
        ),
    },
    "arts": {
        "subj": (
            "the orchestra",
            "a young painter",
            "the novelist",
            "the city museum",
            "the theatre company",
            "a famous sculptor",
            "the jazz band",
            "the poet",
            "the opera house",
            "the ballet company",
        ),
        "act": (
            "opened a new exhibition of modern paintings",
            "premiered a symphony by a forgotten composer",
            "published a third novel",
            "won a prize for poetry",
            "staged a new production of Hamlet",
            "sold a portrait at auction for a record price",
            "toured with a new album",
            "restored a medieval fresco",
            "presented a collection of bronze statues",
            "performed a ballet based on an old folk tale",
        ),
    },
}

_TOPIC_GRAMMAR = Grammar(rules=_TOPIC_SHARED, by_label=_TOPICS)


# --- sentiment: reviews ----------------------------------------------------------------------

_SENTIMENT_SHARED: Rules = {
    "s": (
        "{opener}, {item} {verdict}.",
        "{context}, and {item} {verdict}.",
        "{context}. {item} {verdict}, {closing}.",
        "{item} {verdict}, {closing}.",
        "{contrast}, but overall {item} {verdict}.",
        "{item} {verdict}. {context}.",
        "{context}. {opener}, {item} {verdict}.",
    ),
    "opener": ("overall", "honestly", "all in all", "in short", "frankly", "to be honest", "in the end"),
    "closing": (
        "just as my friends said",
        "which I did not expect",
        "and I will tell everyone about it",
        "whatever the other reviews say",
        "at least in my opinion",
    ),
}

_SENTIMENT_VERDICTS: Mapping[str, tuple[str, ...]] = {
    "positive": (
        "is absolutely wonderful",
        "exceeded all my expectations",
        "was a real pleasure",
        "is worth every penny",
        "turned out to be excellent",
        "is the best I have tried in years",
        "did not disappoint at all",
        "is far better than I expected",
        "made me very happy",
    ),
    "negative": (
        "was a complete disappointment",
        "is a waste of money",
        "turned out to be awful",
        "left me frustrated",
        "is the worst I have tried in years",
        "did not live up to the hype",
        "is far worse than I expected",
        "was not worth it at all",
        "made me regret the whole thing",
    ),
}

_SENTIMENT_CONTRAST: Mapping[str, tuple[str, ...]] = {
    "positive": (
        "the {aspect} could be better",
        "the {aspect} is a bit disappointing",
        "I had doubts about the {aspect}",
    ),
    "negative": ("the {aspect} is fine", "the {aspect} is actually quite nice", "I liked the {aspect}"),
}

# domain -> (shared domain vocabulary, domain-specific verdicts by label)
_SENTIMENT_DOMAINS: Mapping[str, tuple[Rules, Mapping[str, tuple[str, ...]]]] = {
    "product": (
        {
            "item": (
                "this blender",
                "the laptop",
                "my new phone",
                "the vacuum cleaner",
                "this coffee machine",
                "the electric toothbrush",
                "the office chair",
                "this backpack",
                "the smartwatch",
                "the kettle",
            ),
            "aspect": ("battery", "price", "packaging", "manual", "delivery", "screen", "noise level", "colour"),
            "context": (
                "I bought it last month",
                "I ordered it online",
                "my brother gave it to me as a gift",
                "I have used it every day for three weeks",
                "after reading many reviews I finally bought it",
            ),
        },
        {
            "positive": (
                "works perfectly every single day",
                "feels solid and well made",
                "arrived quickly and was easy to set up",
                "has a battery that lasts for days",
            ),
            "negative": (
                "stopped working after two days",
                "broke the first time I used it",
                "feels cheap and flimsy",
                "arrived damaged and missing parts",
            ),
        },
    ),
    "movie": (
        {
            "item": (
                "this film",
                "the sequel",
                "the new thriller",
                "the documentary",
                "this romantic comedy",
                "the animated movie",
                "the director's latest film",
                "this war drama",
                "the space adventure",
                "the remake",
            ),
            "aspect": (
                "acting",
                "plot",
                "soundtrack",
                "ending",
                "dialogue",
                "special effects",
                "pacing",
                "camera work",
            ),
            "context": (
                "we watched it on Friday night",
                "I saw it at the cinema last week",
                "a friend recommended it to me",
                "I streamed it at home with my family",
                "after all the trailers I finally saw it",
            ),
        },
        {
            "positive": (
                "kept me on the edge of my seat",
                "has a brilliant cast and a clever story",
                "made the whole audience laugh",
                "moved me to tears in the best way",
            ),
            "negative": (
                "put me to sleep halfway through",
                "has a predictable and silly plot",
                "felt far too long and boring",
                "wasted a talented cast",
            ),
        },
    ),
    "restaurant": (
        {
            "item": (
                "this restaurant",
                "the new bistro",
                "the little cafe on the corner",
                "the pizza place",
                "this sushi bar",
                "the hotel restaurant",
                "the steakhouse",
                "the vegan diner",
                "this bakery",
                "the seafood grill",
            ),
            "aspect": ("service", "wine list", "portion size", "decor", "dessert menu", "music", "parking", "bread"),
            "context": (
                "we went there for my birthday",
                "I had lunch there with colleagues",
                "we booked a table for Saturday",
                "my parents took us there last night",
                "we tried it after a long walk",
            ),
        },
        {
            "positive": (
                "served the most delicious pasta",
                "has friendly staff and fresh food",
                "serves dishes full of flavour",
                "had us planning our next visit",
            ),
            "negative": (
                "served our food cold",
                "kept us waiting an hour for a table",
                "gave me a stomach ache",
                "charged far too much for tiny plates",
            ),
        },
    ),
}


def _sentiment_grammar(domain: str) -> Grammar:
    vocabulary, verdicts = _SENTIMENT_DOMAINS[domain]
    by_label = {
        label: {"verdict": _SENTIMENT_VERDICTS[label] + verdicts[label], "contrast": _SENTIMENT_CONTRAST[label]}
        for label in _SENTIMENT_VERDICTS
    }
    return Grammar(rules={**_SENTIMENT_SHARED, **vocabulary}, by_label=by_label)


# --- intent: customer messages ---------------------------------------------------------------

_INTENT_SHARED: Rules = {
    "s": (
        "{greet}{core} {signoff}",
        "{greet}{core} {ref} {signoff}",
        "{greet}{ref} {core}",
        "{greet}{core}",
    ),
    "greet": ("", "", "Hello, ", "Hi there, ", "Good morning, ", "Dear team, "),
    "signoff": ("", "Thanks.", "Best regards.", "Thank you.", "Kind regards, {name}.", "Have a nice day."),
    "name": ("Anna", "Tom", "Priya", "Marco", "Chen", "Fatima", "Lukas", "Sofia"),
    "ref": ("my reference is {code}.", "it is about {code}.", "this concerns {code}.", "the number is {code}."),
    "d": tuple("0123456789"),
    "L": tuple("ABCDEFGHJKMNPQRSTUVWXYZ"),
}

_INTENTS: Mapping[str, tuple[str, ...]] = {
    "question": (
        "could you tell me the current status of {thing}?",
        "I was wondering whether {thing} can still be changed.",
        "how long does it usually take to process {thing}?",
        "what are my options for {thing} if my plans change?",
        "could you please let me know when {thing} will be confirmed?",
        "is there a fee for {thing}, and who should I ask about it?",
        "I would like to know if {thing} includes insurance.",
        "do you know what happens to {thing} if I am late?",
    ),
    "request": (
        "please cancel {thing} as soon as possible.",
        "could you please move {thing} to next Tuesday?",
        "I would like you to send me the invoice for {thing}.",
        "can you update the address on {thing} for me?",
        "please issue a full refund for {thing}.",
        "I need you to change the name on {thing}.",
        "could you add a note to {thing} for me, please?",
        "kindly put {thing} on hold until further notice.",
    ),
    "complaint": (
        "I am very unhappy that {thing} is late again.",
        "this is the third time {thing} has gone wrong without any notice.",
        "{thing} was a mess and nobody answered my calls.",
        "I am disappointed that {thing} was nothing like what was promised.",
        "I have waited two weeks for {thing} and it is still not sorted.",
        "frankly, the way {thing} was handled is unacceptable.",
        "why does nobody reply about {thing}? I have had enough.",
        "I expected much better, {thing} has been a nightmare.",
    ),
    "praise": (
        "I just wanted to say that {thing} went better than expected.",
        "thank you so much, {thing} was handled perfectly.",
        "your team did a fantastic job with {thing}.",
        "I am really impressed with how smoothly {thing} went.",
        "many thanks to the staff who sorted out {thing} so quickly.",
        "{thing} was exactly what I hoped for, great work.",
        "why can't every company be like you? {thing} was perfect.",
        "I will happily recommend you, {thing} was a pleasure.",
    ),
}

_INTENT_DOMAINS: Mapping[str, Rules] = {
    "shop": {
        "thing": (
            "my order",
            "the package",
            "the blue jacket I bought",
            "my parcel",
            "the replacement part",
            "the gift card",
            "the winter boots I ordered",
            "my delivery",
            "the sofa I ordered",
            "the phone case",
        ),
        "code": ("order {d}{d}{d}{d}{d}", "order number {d}{d}{d}{d}", "invoice {d}{d}{d}{d}-{d}{d}"),
    },
    "travel": {
        "thing": (
            "my flight to Rome",
            "the hotel booking",
            "my seat reservation",
            "the train ticket",
            "my return flight",
            "the rental car",
            "our family room",
            "the airport transfer",
            "my luggage",
            "the ferry crossing",
        ),
        "code": ("booking {L}{L}{d}{d}{d}", "reservation {L}{d}{d}{d}{d}", "ticket {d}{d}{d}-{d}{d}{d}{d}"),
    },
}


def _intent_grammar(domain: str) -> Grammar:
    by_label = {label: {"core": cores} for label, cores in _INTENTS.items()}
    return Grammar(rules={**_INTENT_SHARED, **_INTENT_DOMAINS[domain]}, by_label=by_label)


# --- the registry ----------------------------------------------------------------------------


def _build() -> dict[str, TextTask]:
    tasks = [
        TextTask(
            name="text-topic-news",
            family="topic",
            labels=("sports", "science", "business", "politics"),
            descriptions=(
                "classify a news sentence by topic: sports, science, business or politics",
                "decide whether a headline is about sport, science, the economy or government",
                "sort news reports into sports, science, business and politics",
            ),
            held_out=False,
            grammar=_TOPIC_GRAMMAR,
        ),
        TextTask(
            name="text-topic-health",
            family="topic",
            labels=("science", "business", "health"),
            descriptions=(
                "classify a news sentence by topic: science, business or health",
                "decide whether a report is about research, companies or medicine",
            ),
            held_out=False,
            grammar=_TOPIC_GRAMMAR,
        ),
        TextTask(
            name="text-topic-leisure",
            family="topic",
            labels=("sports", "arts", "health"),
            descriptions=(
                "classify a news sentence by topic: sports, arts or health",
                "decide whether a report is about sport, culture or medicine",
            ),
            held_out=True,
            grammar=_TOPIC_GRAMMAR,
        ),
        TextTask(
            name="text-topic-culture",
            family="topic",
            labels=("arts", "politics", "science"),
            descriptions=(
                "classify a news sentence by topic: arts, politics or science",
                "decide whether a report is about culture, government or research",
            ),
            held_out=False,
            grammar=_TOPIC_GRAMMAR,
        ),
        TextTask(
            name="text-topic-markets",
            family="topic",
            labels=("sports", "business"),
            descriptions=(
                "classify a news sentence by topic: sports or business",
                "decide whether a report is about sport or companies",
            ),
            held_out=False,
            grammar=_TOPIC_GRAMMAR,
        ),
        TextTask(
            name="text-topic-gallery",
            family="topic",
            labels=("arts", "business", "health"),
            descriptions=(
                "classify a news sentence by topic: arts, business or health",
                "decide whether a report is about culture, companies or medicine",
            ),
            held_out=False,
            grammar=_TOPIC_GRAMMAR,
        ),
        TextTask(
            name="text-topic-fitness",
            family="topic",
            labels=("sports", "health", "politics"),
            descriptions=(
                "classify a news sentence by topic: sports, health or politics",
                "decide whether a report is about sport, medicine or government",
            ),
            held_out=False,
            grammar=_TOPIC_GRAMMAR,
        ),
        TextTask(
            name="text-topic-policy",
            family="topic",
            labels=("politics", "health", "science"),
            descriptions=(
                "classify a news sentence by topic: politics, health or science",
                "decide whether a report is about government, medicine or research",
            ),
            held_out=True,
            grammar=_TOPIC_GRAMMAR,
        ),
        TextTask(
            name="text-sentiment-product",
            family="sentiment",
            labels=("positive", "negative"),
            descriptions=(
                "decide whether a product review is positive or negative",
                "tell if a customer liked or disliked the item they bought",
            ),
            held_out=False,
            grammar=_sentiment_grammar("product"),
        ),
        TextTask(
            name="text-sentiment-movie",
            family="sentiment",
            labels=("positive", "negative"),
            descriptions=(
                "decide whether a movie review is positive or negative",
                "tell if a viewer liked or disliked the film",
            ),
            held_out=False,
            grammar=_sentiment_grammar("movie"),
        ),
        TextTask(
            name="text-sentiment-restaurant",
            family="sentiment",
            labels=("positive", "negative"),
            descriptions=(
                "decide whether a restaurant review is positive or negative",
                "tell if a guest enjoyed or disliked the meal",
            ),
            held_out=True,
            grammar=_sentiment_grammar("restaurant"),
        ),
        TextTask(
            name="text-intent-shop",
            family="intent",
            labels=("question", "complaint", "request", "praise"),
            descriptions=(
                "classify a message to an online shop as a question, complaint, request or praise",
                "decide what a shop customer wants: information, to complain, an action, or to say thanks",
            ),
            held_out=False,
            grammar=_intent_grammar("shop"),
        ),
        TextTask(
            name="text-intent-travel",
            family="intent",
            labels=("question", "complaint", "request"),
            descriptions=(
                "classify a message to a travel agency as a question, complaint or request",
                "decide whether a traveller asks for information, complains or asks for a change",
            ),
            held_out=False,
            grammar=_intent_grammar("travel"),
        ),
        TextTask(
            name="text-intent-trip",
            family="intent",
            labels=("question", "complaint", "request", "praise"),
            descriptions=(
                "classify a message to a travel agency as a question, complaint, request or praise",
                "decide what a traveller wants: information, to complain, a change, or to say thanks",
            ),
            held_out=True,
            grammar=_intent_grammar("travel"),
        ),
    ]
    return by_name(tasks, "text task")


TEXT_TASKS: dict[str, TextTask] = _build()

# Two related pairs (shifted topic label sets; one sentiment in two domains): one task per client
# is non-IID, yet the label space stays at seven labels.
DEFAULT_TEXT_TASKS: str = "text-topic-news,text-topic-health,text-sentiment-product,text-sentiment-movie"


def get_text_task(name: str) -> TextTask:
    """The text task called ``name``; raises with the known names when it does not exist."""
    try:
        return TEXT_TASKS[name]
    except KeyError:
        raise KeyError(f"unknown text task {name!r}; known text tasks: {', '.join(TEXT_TASKS)}") from None
