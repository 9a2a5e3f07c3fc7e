"""NegCLIP-style hard negative captions: a caption changed in one detail, so that it no longer
describes its image (Yuksekgonul et al., ICLR 2023, "When and why vision-language models behave
like bags-of-words").

With random in-batch negatives no batch ever asks whether the star is left or right of the
circle: a model can match bags of words. A hard negative asks exactly that. Each caption gets one,
by one of these edits (drawn among those the caption allows):

- ``relation``: one relation word replaced by its opposite ("left" -> "right", "above" -> "below");
- ``replace``: one attribute or object word replaced by another word of its class that the
  training captions use ("red" -> "blue", "circle" -> "star", "small" -> "large");
- ``swap``: two different words of one class exchanged ("a red circle and a blue square" ->
  "a blue circle and a red square"), which keeps the bag of words and changes the binding.

A caption allowing none of them gets its words shuffled (an order negative, as ARO's). The edit is
drawn from a generator seeded by the caption's text and the run's seed, so a caption gets the same
negative in every epoch, process and resumed run (NegCLIP computes them once, too).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["DEFAULT_WORD_CLASSES", "RELATION_OPPOSITES", "HardNegativeGenerator"]

#: Words a ``replace`` or ``swap`` edit exchanges within a class. Common English attribute and
#: shape words; only those that the training captions contain are used. Synonyms must not share a
#: class (a "small" -> "little" edit would not change the meaning), so sizes are two classes.
DEFAULT_WORD_CLASSES: Mapping[str, Sequence[str]] = {
    "colour": ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "brown", "black", "white",
               "gray", "grey"),
    "shape": ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "pentagon", "rectangle",
              "oval", "heart", "ring"),
    "material": ("wooden", "metal", "plastic", "glass", "stone"),
}
#: Size words: a ``replace`` edit takes a word of the other group (synonyms within a group).
SIZE_GROUPS: Sequence[Sequence[str]] = (("small", "little", "tiny"), ("large", "big", "huge"))
#: Relation words and their opposites (both ways).
RELATION_OPPOSITES: Mapping[str, str] = {
    "left": "right", "right": "left", "above": "below", "below": "above", "over": "under", "under": "over",
    "higher": "lower", "lower": "higher", "beneath": "above", "top": "bottom", "bottom": "top",
    "inside": "outside", "outside": "inside",
}

_WORD = re.compile(r"[A-Za-z]+")


class HardNegativeGenerator:
    """One hard negative caption per caption (see the module docstring).

    Args:
        captions: the training captions; only the class words they contain are used as
            replacements (so every negative stays within the tokenizer's vocabulary).
        seed: the run's seed.
        word_classes: the exchangeable words, by class (default :data:`DEFAULT_WORD_CLASSES`
            plus the two size groups).
    """

    def __init__(self, captions: Iterable[str], seed: int = 0, word_classes: Mapping[str, Sequence[str]] | None = None):
        vocabulary = {word.lower() for caption in captions for word in _WORD.findall(caption)}
        classes = dict(DEFAULT_WORD_CLASSES if word_classes is None else word_classes)
        self.seed = seed
        # word -> (its class's words in the data, the words a replacement may take)
        self.replacements: dict[str, tuple[str, ...]] = {}
        self.word_class: dict[str, str] = {}
        for name, words in classes.items():
            present = tuple(w for w in dict.fromkeys(words) if w in vocabulary)
            for word in present:
                self.word_class[word] = name
                self.replacements[word] = tuple(w for w in present if w != word)
        if word_classes is None:
            groups = [tuple(w for w in group if w in vocabulary) for group in SIZE_GROUPS]
            for index, group in enumerate(groups):
                others = tuple(w for other in groups[:index] + groups[index + 1 :] for w in other)
                for word in group:
                    self.word_class[word] = "size"
                    self.replacements[word] = others
        self.relations = {w: o for w, o in RELATION_OPPOSITES.items() if w in vocabulary}

    def __call__(self, caption: str) -> str:
        """The hard negative of ``caption`` (the same every time for the same caption and seed)."""
        rng = random.Random(hashlib.sha256(f"{self.seed}\0{caption}".encode()).digest())
        words = list(_WORD.finditer(caption))
        edits = []
        relation = [m for m in words if m.group().lower() in self.relations]
        if relation:
            edits.append(("relation", relation))
        replaceable = [m for m in words if self.replacements.get(m.group().lower())]
        if replaceable:
            edits.append(("replace", replaceable))
        swappable = self._swappable(words)
        if swappable:
            edits.append(("swap", swappable))
        if not edits:
            return self._shuffled(caption, rng)
        kind, candidates = rng.choice(edits)
        if kind == "swap":
            first, second = rng.choice(candidates)
            return _substitute(caption, {first: _match_case(second.group(), first.group()),
                                         second: _match_case(first.group(), second.group())})
        match = rng.choice(candidates)
        word = match.group().lower()
        new = self.relations[word] if kind == "relation" else rng.choice(self.replacements[word])
        return _substitute(caption, {match: _match_case(new, match.group())})

    def _swappable(self, words) -> list:
        """Pairs of class words of one class that differ (exchanging equal words changes nothing)."""
        pairs = []
        for i, first in enumerate(words):
            name = self.word_class.get(first.group().lower())
            if name is None:
                continue
            for second in words[i + 1 :]:
                if self.word_class.get(second.group().lower()) == name and second.group().lower() != first.group().lower():
                    pairs.append((first, second))
        return pairs

    @staticmethod
    def _shuffled(caption: str, rng: random.Random) -> str:
        words = caption.split()
        if len(set(words)) < 2:  # nothing to reorder: a reversed caption is the best left
            return caption[::-1]
        shuffled = words[:]
        while shuffled == words:
            rng.shuffle(shuffled)
        return " ".join(shuffled)


def _match_case(new: str, old: str) -> str:
    """``new`` capitalised as ``old`` is (a sentence's first word stays capitalised)."""
    return new[:1].upper() + new[1:] if old[:1].isupper() else new


def _substitute(caption: str, replacements: dict) -> str:
    """``caption`` with each regex match (its span) replaced by its new text."""
    pieces, end = [], 0
    for match in sorted(replacements, key=lambda m: m.start()):
        pieces += [caption[end : match.start()], replacements[match]]
        end = match.end()
    return "".join(pieces) + caption[end:]
