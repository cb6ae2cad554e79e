#!/usr/bin/env python3
"""Generate three small example tasks (sentiment, intent, extract) as chat JSONL.

Stdlib only, no network, fixed seeds: every run writes byte-identical files.
Usage: python examples/tasks/make_tasks.py [--out DIR]   (default: this directory)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import tempfile

N_TRAIN, N_EVAL = 300, 100
MAX_WORDS = 25

# ---------------------------------------------------------------- sentiment
SENT_SYSTEM = ("Classify the sentiment of the review. "
               "Answer with exactly one word: positive, negative, or neutral.")
SENT_LABELS = ["positive", "negative", "neutral"]
# (subjects, aspects, preposition joining aspect to subject)
DOMAINS = [
    (["the movie", "the film", "the sequel", "this documentary", "the new thriller"],
     ["the acting", "the plot", "the soundtrack", "the dialogue", "the pacing"], "in"),
    (["the restaurant", "this cafe", "the diner", "the pizza place", "the new bistro"],
     ["the food", "the service", "the pasta", "the dessert", "the coffee"], "at"),
    (["this phone", "the blender", "the laptop", "this vacuum", "the smartwatch"],
     ["the build quality", "the design", "the setup", "the price", "the packaging"], "of"),
]
POS = ["great", "excellent", "fantastic", "wonderful", "superb", "impressive", "delightful", "outstanding"]
NEG = ["awful", "terrible", "disappointing", "poor", "dreadful", "horrible", "frustrating", "subpar"]
NEU = ["okay", "average", "acceptable", "ordinary", "so-so", "standard", "passable", "alright"]
# Same sentence skeletons for every label, so the template never gives the answer away.
# Fixed rules: "not bad"/"can't complain" -> positive; "not good"/"not {P}, it was {N}" -> negative;
# "not {P}, but not {N} either" -> neutral; in "X, but overall Y" the clause after "but" decides.
SENT_TEMPLATES = {
    "positive": ["{AS} was {P}.", "I thought {S} was {P}.", "{S} was not bad at all.",
                 "{AS} was not bad, {P} even.", "Really {P} experience with {S}.",
                 "{AS} was {N}, but overall it was {P}.", "Would recommend {S}; {A} was {P}.",
                 "Can't complain about {S}, {A} was {P}."],
    "negative": ["{AS} was {N}.", "I thought {S} was {N}.", "{S} was not good at all.",
                 "{AS} was not {P}, in fact it was {N}.", "Really {N} experience with {S}.",
                 "{AS} was {P}, but overall it was {N}.", "Would not recommend {S}; {A} was {N}.",
                 "Can't say I enjoyed {S}, {A} was {N}."],
    "neutral": ["{AS} was {U}.", "I thought {S} was {U}.", "{S} was {U}, nothing special.",
                "{AS} was not {P}, but not {N} either.", "Pretty {U} experience with {S}.",
                "{S} was neither {P} nor {N}.", "{AS} was about what I expected.",
                "Tried {S} once; {A} was {U}."],
}
SENT_OPENERS = ["", "", "Honestly, ", "So, ", "Quick review: ", "Update: ", "In short, "]


def cap(s: str) -> str:
    return s[0].upper() + s[1:]


def gen_sentiment(rng: random.Random, label: str) -> tuple[str, str, str]:
    subjects, aspects, prep = rng.choice(DOMAINS)
    s, a = rng.choice(subjects), rng.choice(aspects)
    core = rng.choice(SENT_TEMPLATES[label]).format(
        S=s, A=a, AS=f"{a} {prep} {s}", P=rng.choice(POS), N=rng.choice(NEG), U=rng.choice(NEU))
    core = cap(core)
    opener = rng.choice(SENT_OPENERS)
    text = core
    if opener.endswith(", ") and not core.startswith("I "):
        text = core[0].lower() + core[1:]  # mid-sentence after a comma opener
    return opener + text, core, label


# ------------------------------------------------------------------- intent
INTENT_LABELS = ["lights_on", "lights_off", "set_temperature", "lock_door", "unlock_door",
                 "check_door", "play_music", "stop_music", "get_weather"]
INTENT_SYSTEM = ("Classify the smart-home command. Answer with exactly one label: "
                 + ", ".join(INTENT_LABELS) + ".")
ROOMS = ["kitchen", "living room", "bedroom", "bathroom", "hallway", "office", "garage",
         "dining room", "basement", "nursery"]
DOORS = ["front door", "back door", "garage door", "side door", "patio door", "basement door",
         "garden gate", "cellar door"]
GENRES = ["jazz", "classical music", "rock", "lo-fi beats", "pop", "80s hits", "hip hop",
          "country", "ambient music", "reggae"]
WHEN = ["today", "tomorrow", "tonight", "this weekend", "this afternoon", "on Friday",
        "tomorrow morning", "on Saturday"]
CITIES = ["", "", " in Boston", " in Berlin", " in Madrid", " in Toronto", " here"]
# label -> (imperatives that may get a polite wrapper, free-form phrasings used as-is).
# Near-miss pairs (lights vs music "off", "make sure ... locked" vs "check whether ... locked")
# are deliberate: they force the model to read the command, not match a keyword.
INTENT_TEMPLATES = {
    "lights_on": (["turn on the {room} lights", "switch on the lights in the {room}",
                   "light up the {room}", "turn the {room} lamp on", "put the lights on in the {room}"],
                  ["{room} lights on", "it's too dark in the {room}",
                   "I can't see anything in the {room}, lights please"]),
    "lights_off": (["turn off the {room} lights", "switch the lights off in the {room}",
                    "kill the lights in the {room}", "turn the {room} lamp off",
                    "shut off the lights in the {room}"],
                   ["{room} lights off", "I'm leaving the {room}, lights off",
                    "too bright in the {room}, lights off please"]),
    "set_temperature": (["set the thermostat to {t} degrees", "make it {t} degrees in the {room}",
                         "change the temperature to {t}", "heat the {room} to {t} degrees",
                         "cool the {room} down to {t} degrees", "bump the heating up to {t}"],
                        ["I'd like the {room} at {t} degrees", "thermostat {t} please",
                         "it's freezing, {t} degrees in the {room} please"]),
    "lock_door": (["lock the {door}", "make sure the {door} is locked", "secure the {door}",
                   "lock up the {door} for the night", "bolt the {door}", "lock the {door} now",
                   "go ahead and lock the {door}"],
                  ["I'm heading out, lock the {door}", "I'm going to bed, lock the {door}"]),
    "unlock_door": (["unlock the {door}", "open the lock on the {door}", "let me in through the {door}",
                     "release the {door} lock", "unlock the {door} now", "go ahead and unlock the {door}"],
                    ["I need the {door} unlocked", "my friend is here, unlock the {door}",
                     "{door} unlock"]),
    "check_door": (["check whether the {door} is locked", "tell me if the {door} is unlocked",
                    "check the {door} lock", "see if the {door} is locked"],
                   ["is the {door} locked?", "did I lock the {door}?", "is the {door} still unlocked?",
                    "what's the status of the {door} lock?", "did anyone leave the {door} unlocked?"]),
    "play_music": (["play some {genre} in the {room}", "put on {genre}",
                    "start playing {genre} in the {room}", "shuffle my {genre} playlist", "play {genre}"],
                   ["I want to hear {genre} in the {room}", "music in the {room}, something like {genre}",
                    "I'm in the mood for {genre}"]),
    "stop_music": (["stop the music", "stop the music in the {room}", "pause the music in the {room}",
                    "turn the music off in the {room}", "silence the speakers in the {room}",
                    "turn off the speaker in the {room}", "kill the music in the {room}"],
                   ["enough music for now", "no more music in the {room}",
                    "that's enough {genre}, stop it"]),
    "get_weather": (["tell me the weather{city} {when}", "check the forecast{city} {when}"],
                    ["what's the weather like{city} {when}?", "will it rain{city} {when}?",
                     "do I need an umbrella {when}?", "how cold will it be{city} {when}?",
                     "is it going to be sunny{city} {when}?", "should I wear a jacket {when}?"]),
}
WRAPPERS = ["{x}", "{x}", "please {x}", "{x} please", "hey, {x}", "could you {x}?", "can you {x}?"]


def gen_intent(rng: random.Random, label: str) -> tuple[str, str, str]:
    imps, others = INTENT_TEMPLATES[label]
    use_imp = rng.random() < len(imps) / (len(imps) + len(others))
    tpl = rng.choice(imps if use_imp else others)
    core = tpl.format(room=rng.choice(ROOMS), door=rng.choice(DOORS), t=rng.randint(16, 26),
                      genre=rng.choice(GENRES), when=rng.choice(WHEN), city=rng.choice(CITIES))
    text = rng.choice(WRAPPERS).format(x=core) if use_imp else core
    if not text.endswith("?"):
        text += rng.choice(["", ".", "!"])
    if rng.random() < 0.6:  # users type both "Turn on..." and "turn on..."
        text = cap(text)
    return text, core, label


# ------------------------------------------------------------------ extract
EXTRACT_SYSTEM = ('Extract the event details. Reply with one line of JSON: '
                  '{"who": ..., "day": ..., "time": ..., "place": ...}, values copied verbatim.')
NAMES = ["Maria", "Tom", "Priya", "Jonas", "Aisha", "Kenji", "Lucia", "Omar", "Elena", "Sam",
         "Dr. Patel", "Coach Rivera", "Grandma", "Professor Kim"]  # all capitalized: safe at sentence start
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
PLACES = [("in", "the cafeteria"), ("at", "Cafe Luna"), ("in", "Room 204"), ("at", "the library"),
          ("in", "the main office"), ("at", "the park"), ("at", "the gym"), ("in", "conference room B"),
          ("at", "the train station"), ("on", "the rooftop terrace"), ("in", "the lobby"),
          ("at", "the Italian place on 5th")]
EVENTS = [("Lunch", "lunch"), ("Coffee", "coffee"), ("Dinner", "dinner"), ("Meeting", "a meeting"),
          ("Study session", "a study session"), ("Project review", "a project review"),
          ("Tennis", "tennis"), ("Drinks", "drinks"), ("Interview", "an interview"),
          ("Yoga class", "a yoga class")]
# Slot order varies across templates so the model must locate fields, not copy positions.
EXTRACT_TEMPLATES = [
    "{Ev} with {who} on {day} at {time} {prep} {place}.",
    "On {day} at {time}, {ev} with {who} {prep} {place}.",
    "{who} and I have {ev} {prep} {place} on {day} at {time}.",
    "Reminder: {ev} {prep} {place} with {who}, {day} at {time}.",
    "{Ev} {prep} {place} at {time} on {day} with {who}.",
    "Don't forget {ev} with {who} at {time} {prep} {place} on {day}.",
    "{who} booked {ev} for {day}, {time}, {prep} {place}.",
    "Can you join {ev} {prep} {place} with {who} on {day} at {time}?",
]


def fmt_time(rng: random.Random) -> str:
    h, m = rng.randint(7, 20), rng.choice([0, 0, 0, 15, 30, 45])
    h12 = h - 12 if h > 12 else h
    return f"{h12}{f':{m:02d}' if m else ''}{'am' if h < 12 else 'pm'}"


def gen_extract(rng: random.Random, label: str) -> tuple[str, str, str]:
    who = rng.choice(NAMES)
    if rng.random() < 0.25 and label != "2":  # no pair in "{who} and I ...": "A and B and I" reads badly
        who = f"{who} and {rng.choice([n for n in NAMES if n != who])}"
    day, time, (prep, place) = rng.choice(DAYS), fmt_time(rng), rng.choice(PLACES)
    ev_cap, ev = rng.choice(EVENTS)
    text = EXTRACT_TEMPLATES[int(label)].format(Ev=ev_cap, ev=ev, who=who, day=day, time=time,
                                                 prep=prep, place=place)
    obj = {"who": who, "day": day, "time": time, "place": place}
    assert all(v in text for v in obj.values()), text  # values must be verbatim spans
    return text, text, json.dumps(obj, separators=(", ", ": "))


# ------------------------------------------------------------------ builder
TASKS = [  # name, system prompt, labels (balanced round-robin), generator, fixed seed
    ("sentiment", SENT_SYSTEM, SENT_LABELS, gen_sentiment, 1101),
    ("intent", INTENT_SYSTEM, INTENT_LABELS, gen_intent, 2202),
    ("extract", EXTRACT_SYSTEM, [str(i) for i in range(len(EXTRACT_TEMPLATES))], gen_extract, 3303),
]


def norm(s: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", s.lower()).split())


def build(system: str, labels: list[str], gen, seed: int) -> dict[str, list[dict]]:
    rng = random.Random(seed)  # own RNG per task: adding a task never changes the others
    seen: set[str] = set()  # normalized cores: no duplicates, and no near-duplicates across splits
    splits: dict[str, list[dict]] = {}
    for split, n in (("train", N_TRAIN), ("eval", N_EVAL)):
        plan = [labels[i % len(labels)] for i in range(n)]  # balanced within each split
        rng.shuffle(plan)
        rows = []
        for label in plan:
            for _ in range(10000):
                user, core, answer = gen(rng, label)
                if norm(core) not in seen:
                    break
            else:
                raise RuntimeError(f"template pool exhausted for label {label!r}")
            seen.add(norm(core))
            assert len(user.split()) < MAX_WORDS, user
            rows.append({"messages": [{"role": "system", "content": system},
                                      {"role": "user", "content": user},
                                      {"role": "assistant", "content": answer}]})
        splits[split] = rows
    users = {s: {r["messages"][1]["content"] for r in rows} for s, rows in splits.items()}
    assert len(users["train"]) == N_TRAIN and len(users["eval"]) == N_EVAL
    assert not users["train"] & users["eval"], "train/eval share user text"
    assert not {norm(u) for u in users["train"]} & {norm(u) for u in users["eval"]}
    return splits


def write_atomic(path: str, rows: list[dict]) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".jsonl")  # same dir: replace is atomic
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; make the result readable like a normal file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                    help="output directory (default: the directory containing this script)")
    args = ap.parse_args()
    for name, system, labels, gen, seed in TASKS:
        for split, rows in build(system, labels, gen, seed).items():
            path = os.path.join(args.out, name, f"{split}.jsonl")
            write_atomic(path, rows)
            print(f"wrote {path}: {len(rows)} rows")


if __name__ == "__main__":
    main()
