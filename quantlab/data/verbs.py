"""A generated English verb-tense corpus and its multiple-choice task.

Every sentence is a time cue, a subject and a verb phrase, e.g. "Yesterday the baker walked to the
store." The cue fixes the tense (past, present habitual, future with "will") and the subject fixes the
present-tense form (3rd-person singular "walks" vs base "walk"), so exactly one of the three forms
base / 3rd-person / past fits each blank: a model that learned English tense picks it.

Train and test sentences use disjoint (subject, verb) pairs: the test set asks for combinations the
model never saw, so it measures agreement and tense rather than memorised sentences. The pair split
depends on nothing but the pair itself, so every seed of either split respects it.
"""
from __future__ import annotations

import functools
import hashlib
import random
from dataclasses import dataclass

from quantlab.data.tasks import MCItem

SPLITS = ("train", "test")
TEST_PAIR_FRACTION = 0.2

# "base past | complement; complement": past forms are spelled out (irregular verbs and consonant
# doubling need no rules); verbs whose past equals the base (put, cut, read) are left out because
# their three candidates would not be distinct.
_VERB_TABLE = """
walk walked | to the store; home after work; along the river
talk talked | to the neighbours; about the weather; with the teacher
cook cooked | dinner for the family; a pot of soup; rice and beans
clean cleaned | the kitchen; the windows; the old car
paint painted | the fence; a picture of the sea; the front door
play played | football in the park; the piano; cards with friends
watch watched | the news; a film at the cinema; the birds in the garden
wash washed | the dishes; the car; the dog
open opened | the window; a new shop; the letter
close closed | the door; the shop early; the book
visit visited | the museum; an old friend; the market
help helped | the old man; a lost child; with the harvest
call called | the doctor; a taxi; home
ask asked | a question; for directions; the teacher for help
answer answered | the phone; the letter; every question
carry carried | the heavy boxes; a basket of apples; the bags upstairs
study studied | for the exam; history at night; the map
try tried | a new recipe; the soup; to fix the roof
worry worried | about the money; about the exam; about the weather
hurry hurried | to the station; home; across the bridge
marry married | a sailor; in the spring; in the old church
stop stopped | at the corner; the car; for lunch
plan planned | a trip to the coast; the party; the garden
drop dropped | the glass; a coin; the keys
shop shopped | for shoes; at the market; for bread
jog jogged | around the lake; in the morning; to the park
hug hugged | the children; an old friend; the puppy
grab grabbed | a coat; the last seat; a sandwich
admit admitted | the mistake; the truth; the error
prefer preferred | tea to coffee; the quiet room; the red dress
travel travelled | to the coast; by train; across the country
fix fixed | the bicycle; the broken chair; the leaking tap
mix mixed | the paint; the flour and the eggs; the salad
miss missed | the bus; the train; the old house
pass passed | the salt; the exam; the old mill
push pushed | the cart; the door open; the heavy table
touch touched | the wall; the cold water; the painting
reach reached | the top of the hill; the station; the village
teach taught | the children; a class on Monday; music at the school
catch caught | the ball; a fish; the early train
buy bought | fresh bread; a new coat; a ticket
bring brought | a cake; the newspaper; flowers for the table
think thought | about the future; about the problem; of a plan
fight fought | the fire; for the title; with the wind
seek sought | advice; shelter from the rain; the truth
sell sold | the old car; fresh fish; apples at the market
tell told | a story; the truth; a joke
find found | the keys; a coin in the street; the way home
hold held | the baby; the door open; a meeting
stand stood | by the window; in the rain; at the gate
understand understood | the lesson; the question; the rules
feel felt | tired; the cold wind; much better
keep kept | the change; a diary; the garden tidy
sleep slept | in the attic; late; under the stars
sweep swept | the floor; the yard; the steps
leave left | the house early; a note; the party
meet met | a friend for lunch; the new teacher; the mayor
lead led | the group; the way; the team to victory
feed fed | the cat; the chickens; the horses
send sent | a letter; a parcel; a message
spend spent | the money; the summer by the sea; an hour in the garden
build built | a wall; a boat; a small shed
lend lent | a book; some money; a pen
bend bent | the wire; the branch; down to tie a shoe
lose lost | the keys; the game; a glove
make made | a cake; the bed; a new friend
hear heard | the music; a strange noise; the news
say said | hello; goodbye; a few words
pay paid | the bill; the rent; for the tickets
lay laid | the table; the baby down; the bricks
sit sat | by the fire; on the bench; at the back
win won | the race; a prize; the match
dig dug | a hole; the garden; for treasure
hang hung | the picture; the washing out; a lamp
shoot shot | an arrow; the film; at the target
get got | a letter; a new job; home late
forget forgot | the keys; the name; the meeting
begin began | the lesson; a new book; the journey
drink drank | a glass of milk; cold water; hot tea
sing sang | a song; in the choir; to the baby
swim swam | in the lake; across the river; every lap
ring rang | the bell; the doctor; the office
run ran | to the station; a mile; home
come came | home early; to the party; back from the market
give gave | a present; a speech; the dog a bone
eat ate | an apple; breakfast; the whole pie
see saw | the sea; a fox; the doctor
go went | to the store; to bed early; to the beach
do did | the homework; the washing; the shopping
write wrote | a letter; a poem; a short story
drive drove | to work; the bus; the children to school
ride rode | a horse; the bus; a bicycle to town
rise rose | early; from the chair; before dawn
take took | the bus; a photograph; the medicine
shake shook | hands; the rug; the bottle
wake woke | up early; the children; at dawn
speak spoke | to the crowd; quietly; to the manager
break broke | the window; a plate; the news
choose chose | the blue shirt; a seat by the window; a good book
freeze froze | the meat; in the cold; the fruit
steal stole | a horse; the money; a glance
wear wore | a hat; a warm coat; the new boots
tear tore | the paper; the page; the old sheet
throw threw | the ball; a stone; the old shoes away
grow grew | tomatoes; roses; a beard
know knew | the answer; the way; the whole story
draw drew | a map; a picture; the curtains
fly flew | to Paris; a kite; home for the holidays
blow blew | out the candles; the horn; on the soup
show showed | the photos; the way; the new house
fall fell | asleep; off the horse; down the stairs
forgive forgave | the mistake; an old enemy; the debt
hide hid | the present; behind the door; the money
bite bit | the apple; into the bread; a nail
light lit | the candle; the fire; the lamp
climb climbed | the hill; the stairs; a tree
jump jumped | over the fence; into the lake; for joy
laugh laughed | at the joke; loudly; at the clown
learn learned | French; to swim; the song
listen listened | to the radio; to the story; carefully
look looked | at the stars; for the cat; out of the window
need needed | help; a new coat; more time
want wanted | a cup of tea; a new bicycle; to go home
work worked | in the garden; at the bank; late
start started | the car; a new job; the lesson
finish finished | the work; the book; dinner
move moved | to the city; the table; the car
live lived | in a small house; near the sea; with an aunt
love loved | the sea; the old songs; the garden
like liked | the film; the new teacher; the music
dance danced | at the wedding; all night; in the kitchen
smile smiled | at the baby; at the stranger; politely
arrive arrived | at the station; home late; early
decide decided | to stay; to leave; to move
change changed | the plan; the tyre; trains at York
use used | the computer; a knife; the old map
bake baked | bread; a cake; a pie
chase chased | the cat; the ball; the bus
count counted | the money; the sheep; to ten
rest rested | in the shade; after lunch; for an hour
wait waited | for the bus; at the gate; in the hall
plant planted | a tree; potatoes; roses
print printed | the letter; the tickets; the photos
collect collected | stamps; the children; the post
repair repaired | the roof; the clock; the fence
invite invited | the neighbours; a friend to dinner; the whole class
greet greeted | the guests; the teacher; the visitors
thank thanked | the host; the driver; the nurse
borrow borrowed | a book; some sugar; the car
follow followed | the river; the path; the rules
fill filled | the bucket; the glass; the form
kill killed | a fly; the engine; the weeds
pull pulled | the rope; the cart; the weeds
turn turned | left; the page; the key
burn burned | the toast; the old letters; the leaves
order ordered | a pizza; the fish; more bread
offer offered | help; a seat; a cup of tea
remember remembered | the name; the song; the old days
enter entered | the room; the race; the house
deliver delivered | the mail; the parcels; the milk
obey obeyed | the rules; the captain; the law
enjoy enjoyed | the concert; the meal; the sunshine
pray prayed | for rain; in the chapel; every night
stay stayed | at home; in a hotel; for dinner
fry fried | the eggs; the fish; some onions
cry cried | at the film; for help; all night
dry dried | the dishes; the clothes; the hair
reply replied | to the letter; at once; politely
copy copied | the notes; the letter; the picture
rush rushed | to the station; home; out of the room
kiss kissed | the baby; the bride; the old man goodbye
guess guessed | the answer; the price; the name
relax relaxed | in the garden; by the pool; after work
search searched | for the keys; the house; the woods
crash crashed | the car; into the wall; the party
wish wished | for snow; for a dog; everyone luck
fetch fetched | water; the doctor; the newspaper
march marched | to the square; through the town; in the parade
point pointed | at the map; to the door; at the moon
explain explained | the rules; the plan; the problem
""".strip().splitlines()

PRONOUNS = {  # pronoun -> takes the 3rd-person singular form
    "I": False, "you": False, "he": True, "she": True, "we": False, "they": False,
}
SINGULAR_NOUNS = (
    "the teacher", "my sister", "my brother", "the doctor", "our neighbour", "the old man",
    "the little girl", "the farmer", "the baker", "the student", "my friend", "the king", "the queen",
    "Anna", "Tom", "Maria", "the captain", "the child", "my father", "my mother", "the nurse",
    "the driver", "the pilot", "the boy",
)
PLURAL_NOUNS = (
    "the children", "my parents", "the students", "our neighbours", "the farmers", "the soldiers",
    "my friends", "the girls", "the boys", "the workers", "the players", "the sailors", "the twins",
    "the nurses",
)

# Tense -> time cues. The cue always opens the sentence, before the verb: a causal model reads it
# before choosing the form (a cue after the verb would test backward consistency, which tiny models
# learn far more slowly than tense itself).
TIME_CUES = {
    "past": ("Yesterday", "Last night", "Last week", "Last year", "Two days ago", "Last summer",
             "A week ago", "The day before yesterday"),
    "habitual": ("Every day", "Every morning", "Every evening", "Every week", "Usually", "Often",
                 "On weekends", "Most days"),
    "future": ("Tomorrow", "Next week", "Next year", "Tomorrow morning", "Soon", "Next month",
               "In two days", "Next summer"),
}


@dataclass(frozen=True)
class Verb:
    base: str
    third_person: str
    past: str
    complements: tuple[str, ...]

    @property
    def forms(self) -> tuple[str, str, str]:
        return (self.base, self.third_person, self.past)


@dataclass(frozen=True)
class Subject:
    text: str
    third_singular: bool


def third_person_singular(base: str) -> str:
    """English 3rd-person singular present: 'watch' -> 'watches', 'carry' -> 'carries'."""
    if base in ("go", "do"):
        return base + "es"
    if base.endswith(("s", "sh", "ch", "x", "z")):
        return base + "es"
    if base.endswith("y") and base[-2] not in "aeiou":
        return base[:-1] + "ies"
    return base + "s"


def _parse_verbs(lines: list[str]) -> tuple[Verb, ...]:
    verbs: dict[str, Verb] = {}
    for line in lines:
        head, _, tail = line.partition("|")
        base, past = head.split()
        complements = tuple(c.strip() for c in tail.split(";"))
        if base in verbs or not all(complements):
            raise ValueError(f"verb table row {line!r} repeats a verb or has an empty complement")
        verbs[base] = Verb(base, third_person_singular(base), past, complements)
    return tuple(verbs[b] for b in sorted(verbs))


VERBS = _parse_verbs(_VERB_TABLE)
SUBJECTS = tuple(
    [Subject(p, third) for p, third in PRONOUNS.items()]
    + [Subject(n, True) for n in SINGULAR_NOUNS]
    + [Subject(n, False) for n in PLURAL_NOUNS]
)


def pair_split(subject: Subject, verb: Verb) -> str:
    """'train' or 'test' for a (subject, verb) pair, from a hash of the pair alone (no seed), so the
    two splits never share a pair whatever seeds generate them."""
    digest = hashlib.sha256(f"{subject.text}|{verb.base}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < TEST_PAIR_FRACTION else "train"


@functools.cache   # pure in split: hashing every pair once is enough
def split_pairs(split: str) -> tuple[tuple[Subject, Verb], ...]:
    if split not in SPLITS:
        raise ValueError(f"unknown verbs split {split!r}; choose one of {', '.join(SPLITS)}")
    return tuple((s, v) for s in SUBJECTS for v in VERBS if pair_split(s, v) == split)


@dataclass(frozen=True)
class VerbSentence:
    """One generated sentence, with the verb slot marked so it can become a task item."""
    subject: str
    verb: str          # base form: with ``subject``, the pair that decides the sentence's split
    before: str        # text up to the verb slot, e.g. "Yesterday he " or "Tomorrow he will "
    after: str         # text after it, e.g. " to the store."
    forms: tuple[str, str, str]   # base, 3rd-person singular, past
    answer: int        # index into forms

    @property
    def text(self) -> str:
        return self.before + self.forms[self.answer] + self.after


def make_sentence(subject: Subject, verb: Verb, tense: str, cue: str, complement: str) -> VerbSentence:
    if tense == "past":
        answer, auxiliary = 2, ""
    elif tense == "habitual":
        answer, auxiliary = (1 if subject.third_singular else 0), ""
    elif tense == "future":
        answer, auxiliary = 0, "will "   # "will" takes the base form for every subject
    else:
        raise ValueError(f"unknown tense {tense!r}; choose one of {', '.join(TIME_CUES)}")
    return VerbSentence(subject.text, verb.base, before=f"{cue} {subject.text} {auxiliary}",
                        after=f" {complement}.", forms=verb.forms, answer=answer)


def sample_sentences(split: str, rng: random.Random, n: int) -> list[VerbSentence]:
    """``n`` sentences over the (subject, verb) pairs of ``split``: tense, cue and complement uniform."""
    pairs = split_pairs(split)
    tenses = tuple(TIME_CUES)
    sentences = []
    for _ in range(n):
        subject, verb = rng.choice(pairs)
        tense = rng.choice(tenses)
        cue = rng.choice(TIME_CUES[tense])
        sentences.append(make_sentence(subject, verb, tense, cue, rng.choice(verb.complements)))
    return sentences


def verbs_text(split: str, seed: int = 0, n_sentences: int = 20000) -> str:
    """``n_sentences`` generated sentences of ``split``, one per line, deterministic in ``seed``."""
    rng = random.Random(f"verbs-text/{split}/{seed}")
    return "\n".join(s.text for s in sample_sentences(split, rng, n_sentences)) + "\n"


def verb_tense_task(split: str = "test", seed: int = 0, n_items: int = 600) -> list[MCItem]:
    """Fill-the-blank items: 'Yesterday he __ to the store.' with the verb's base, 3rd-person and
    past forms as the candidates, in a seeded random order so the answer's position carries no signal."""
    rng = random.Random(f"verb-tense-task/{split}/{seed}")
    items = []
    for sentence in sample_sentences(split, rng, n_items):
        order = [0, 1, 2]
        rng.shuffle(order)
        items.append(MCItem(context=sentence.before + "__" + sentence.after,
                            choices=[sentence.forms[i] for i in order],
                            answer=order.index(sentence.answer)))
    return items
