"""Writes station_log.txt, the long document of README's main job (`make ask`).

A fictional research station's daily log, about 6,000 SmolLM2 tokens, in varied sentences so that
a model cannot guess facts from repetition. One entry, at about 80% depth, records the answer:
the east cargo door's access code. Deterministic: the same seed gives the same file.
"""

import random
from pathlib import Path

SYSTEMS = ["water recycler", "solar array", "greenhouse lamps", "seismometer", "radio mast", "air scrubber",
           "battery bank", "weather balloon winch", "drill rig", "kitchen freezer", "hydroponic pumps", "heat exchanger"]
PEOPLE = ["Amara", "Bjorn", "Chen", "Dalia", "Emeka", "Farah", "Goran", "Hana", "Ines", "Jonas"]
WEATHER = ["clear and still", "overcast with light snow", "windy, gusts near forty knots", "foggy until noon",
           "bright but bitterly cold", "a whiteout in the afternoon", "calm, with a faint halo around the sun"]
ACTIONS = ["replaced a worn gasket on the {s}", "recalibrated the {s} after a drift of {n} percent",
           "logged a pressure reading of {n} kilopascals at the {s}", "cleaned dust from the {s}",
           "ran the weekly self-test of the {s}, which passed", "noted a rattle in the {s} and tightened two bolts",
           "measured {n} litres of output from the {s}", "updated the firmware of the {s} to build {n}"]
REMARKS = ["Dinner was lentil stew.", "Morale is good.", "The aurora was visible after midnight.",
           "A skua circled the mast for an hour.", "Supplies are on schedule.", "Someone fixed the squeaky chair.",
           "The library got two new novels from the last flight.", "Chess tournament standings are unchanged."]


def entry(rng: random.Random, day: int) -> str:
    who = rng.sample(PEOPLE, 2)
    acts = [rng.choice(ACTIONS).format(s=rng.choice(SYSTEMS), n=rng.randint(2, 990)) for _ in range(2)]
    return (f"Day {day}. Weather: {rng.choice(WEATHER)}. {who[0]} {acts[0]}, and {who[1]} {acts[1]}. "
            f"{rng.choice(REMARKS)}")


def main() -> None:
    rng = random.Random(7)
    days = [entry(rng, d) for d in range(1, 141)]
    days[111] += (" Hana changed the access code of the east cargo door to 7318 after the old keypad failed;"
                  " the new code is 7318.")
    text = "Log of Halvorsen Research Station, winter season.\n\n" + "\n".join(days) + "\n"
    Path(__file__).with_name("station_log.txt").write_text(text)


if __name__ == "__main__":
    main()
