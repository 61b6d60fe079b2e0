"""Generated grade-school math word problems with worked, step-by-step solutions (GSM8K style).

Every generator draws its numbers from a ``random.Random`` so that a problem is a pure function of the
seed, keeps every intermediate value an integer, and writes each arithmetic step as ``a op b = c``; the
solution ends with the line ``#### <answer>`` (read back by :func:`fusion_jax.eval.answers.extract_answer`).
``meta`` records the template and the numbers drawn so
that a test can recompute the answer independently.
"""
from __future__ import annotations

import random
from typing import Callable

NAMES = ["Mia", "Liam", "Ava", "Noah", "Sofia", "Ethan", "Zoe", "Omar", "Lena", "Ravi", "Chen", "Priya",
         "Lucas", "Emma", "Kofi", "Hana", "Mateo", "Nora", "Yusuf", "Ines", "Jonas", "Aisha", "Leo", "Maya"]
ITEMS = [("apple", "apples"), ("marble", "marbles"), ("sticker", "stickers"), ("pencil", "pencils"),
         ("cookie", "cookies"), ("book", "books"), ("shell", "shells"), ("card", "cards"),
         ("stamp", "stamps"), ("bead", "beads")]
CONTAINERS = [("box", "boxes"), ("bag", "bags"), ("crate", "crates"), ("jar", "jars"), ("basket", "baskets")]
GOODS = [("notebook", "notebooks"), ("sandwich", "sandwiches"), ("ticket", "tickets"), ("toy car", "toy cars"),
         ("plant", "plants"), ("shirt", "shirts"), ("mug", "mugs"), ("ball", "balls")]
VEHICLES = ["car", "train", "bus", "truck", "boat"]
MACHINES = [("printer", "pages"), ("bakery oven", "loaves"), ("factory machine", "bolts"),
            ("juice press", "bottles"), ("loom", "scarves")]


def _add_sub(rng: random.Random):
    name = rng.choice(NAMES)
    item, items = rng.choice(ITEMS)
    a, b = rng.randint(5, 90), rng.randint(3, 60)
    c = rng.randint(1, a + b - 1)
    q = (f"{name} has {a} {items}. {name} finds {b} more {items} and then gives {c} {items} to a friend. "
         f"How many {items} does {name} have now?")
    s1, s2 = a + b, a + b - c
    sol = (f"After finding more, {name} has {a} + {b} = {s1} {items}.\n"
           f"After giving some away, {name} has {s1} - {c} = {s2} {items}.\n#### {s2}")
    return q, sol, s2, {"a": a, "b": b, "c": c}


def _groups(rng: random.Random):
    name = rng.choice(NAMES)
    item, items = rng.choice(ITEMS)
    cont, conts = rng.choice(CONTAINERS)
    n, k, extra = rng.randint(2, 15), rng.randint(3, 24), rng.randint(0, 20)
    q = (f"{name} has {n} {conts} with {k} {items} in each {cont}, plus {extra} loose {items}. "
         f"How many {items} does {name} have in total?")
    s1 = n * k
    s2 = s1 + extra
    sol = (f"The {conts} hold {n} * {k} = {s1} {items}.\n"
           f"Adding the loose ones gives {s1} + {extra} = {s2} {items}.\n#### {s2}")
    return q, sol, s2, {"n": n, "k": k, "extra": extra}


def _change(rng: random.Random):
    name = rng.choice(NAMES)
    (g1, g1s), (g2, g2s) = rng.sample(GOODS, 2)
    x, p, y, r = rng.randint(2, 6), rng.randint(2, 15), rng.randint(1, 5), rng.randint(3, 20)
    total = x * p + y * r
    bill = next(b for b in (20, 50, 100, 200) if b >= total)
    q = (f"{name} buys {x} {g1s} for ${p} each and {y} {g2s if y > 1 else g2} for ${r} each. "
         f"{name} pays with a ${bill} bill. How much change, in dollars, does {name} get back?")
    a1, a2 = x * p, y * r
    sol = (f"The {g1s} cost {x} * {p} = {a1} dollars.\n"
           f"The {g2s} cost {y} * {r} = {a2} dollars.\n"
           f"Together they cost {a1} + {a2} = {total} dollars.\n"
           f"The change is {bill} - {total} = {bill - total} dollars.\n#### {bill - total}")
    return q, sol, bill - total, {"x": x, "p": p, "y": y, "r": r, "bill": bill}


def _discount(rng: random.Random):
    name = rng.choice(NAMES)
    good, _ = rng.choice(GOODS)
    pct = rng.choice([10, 20, 25, 30, 40, 50, 75])
    price = rng.randint(1, 30) * 20  # multiples of 20 keep every discount here an integer
    q = (f"A {good} normally costs ${price}. The store has a {pct}% off sale. "
         f"How many dollars does {name} pay for the {good} during the sale?")
    off_x100 = price * pct
    off = off_x100 // 100
    sol = (f"The discount is {price} * {pct} / 100 = {off} dollars.\n"
           f"{name} pays {price} - {off} = {price - off} dollars.\n#### {price - off}")
    return q, sol, price - off, {"price": price, "pct": pct}


def _speed(rng: random.Random):
    veh = rng.choice(VEHICLES)
    s1, t1, s2, t2 = rng.randint(20, 80), rng.randint(1, 6), rng.randint(20, 80), rng.randint(1, 5)
    q = (f"A {veh} travels at {s1} miles per hour for {t1} hours, then at {s2} miles per hour for "
         f"{t2} more hours. How many miles does the {veh} travel in total?")
    d1, d2 = s1 * t1, s2 * t2
    sol = (f"In the first part it travels {s1} * {t1} = {d1} miles.\n"
           f"In the second part it travels {s2} * {t2} = {d2} miles.\n"
           f"In total it travels {d1} + {d2} = {d1 + d2} miles.\n#### {d1 + d2}")
    return q, sol, d1 + d2, {"s1": s1, "t1": t1, "s2": s2, "t2": t2}


def _rate(rng: random.Random):
    machine, units = rng.choice(MACHINES)
    per_min = rng.randint(2, 12)
    hours, minutes = rng.randint(1, 5), rng.choice([0, 10, 15, 20, 30, 45])
    q = (f"A {machine} makes {per_min} {units} every minute. How many {units} does it make in "
         f"{hours} hours and {minutes} minutes?")
    m1 = hours * 60
    m2 = m1 + minutes
    out = m2 * per_min
    sol = (f"{hours} hours is {hours} * 60 = {m1} minutes.\n"
           f"Adding {minutes} minutes gives {m1} + {minutes} = {m2} minutes.\n"
           f"It makes {m2} * {per_min} = {out} {units}.\n#### {out}")
    return q, sol, out, {"per_min": per_min, "hours": hours, "minutes": minutes}


def _share(rng: random.Random):
    name = rng.choice(NAMES)
    item, items = rng.choice(ITEMS)
    friends = rng.randint(2, 9)
    each = rng.randint(3, 15)
    eaten = rng.randint(1, each - 1)
    total = friends * each
    q = (f"{name} shares {total} {items} equally among {friends} friends. Each friend then uses "
         f"{eaten} of their {items}. How many {items} does each friend have left?")
    sol = (f"Each friend gets {total} / {friends} = {each} {items}.\n"
           f"Each friend has {each} - {eaten} = {each - eaten} {items} left.\n#### {each - eaten}")
    return q, sol, each - eaten, {"total": total, "friends": friends, "eaten": eaten}


def _fraction(rng: random.Random):
    k = rng.choice([2, 3, 4, 5])
    n = k * rng.randint(4, 12)
    stay = rng.randint(1, n - n // k - 1)
    q = (f"A class has {n} students. One out of every {k} students walks to school and the rest take the "
         f"bus. On Friday, {stay} of the bus riders stay home. How many students take the bus on Friday?")
    walk = n // k
    bus = n - walk
    sol = (f"{n} / {k} = {walk} students walk.\n"
           f"So {n} - {walk} = {bus} students take the bus.\n"
           f"On Friday {bus} - {stay} = {bus - stay} students take the bus.\n#### {bus - stay}")
    return q, sol, bus - stay, {"n": n, "k": k, "stay": stay}


def _average(rng: random.Random):
    name = rng.choice(NAMES)
    while True:
        scores = [rng.randint(55, 100) for _ in range(3)]
        if sum(scores) % 3 == 0:
            break
    a, b, c = scores
    q = f"{name} scored {a}, {b} and {c} on three tests. What is {name}'s average score?"
    s1 = a + b
    s2 = s1 + c
    sol = (f"The total is {a} + {b} = {s1}, and {s1} + {c} = {s2}.\n"
           f"The average is {s2} / 3 = {s2 // 3}.\n#### {s2 // 3}")
    return q, sol, s2 // 3, {"scores": scores}


def _interest(rng: random.Random):
    name = rng.choice(NAMES)
    principal = rng.randint(1, 50) * 100
    rate = rng.randint(1, 9)
    years = rng.randint(1, 6)
    q = (f"{name} puts ${principal} in a savings account that pays {rate}% simple interest per year. "
         f"How many dollars of interest does {name} earn after {years} years?")
    per_year = principal * rate // 100
    total = per_year * years
    sol = (f"Each year the interest is {principal} * {rate} / 100 = {per_year} dollars.\n"
           f"Over {years} years that is {per_year} * {years} = {total} dollars.\n#### {total}")
    return q, sol, total, {"principal": principal, "rate": rate, "years": years}


TEMPLATES: dict[str, Callable[[random.Random], tuple]] = {
    "add_sub": _add_sub, "groups": _groups, "change": _change, "discount": _discount,
    "speed": _speed, "rate": _rate, "share": _share, "fraction": _fraction,
    "average": _average, "interest": _interest,
}


def generate_problem(rng: random.Random, template: str | None = None) -> dict:
    """One problem: ``{"question", "solution", "answer", "template", "meta"}``."""
    name = template or rng.choice(sorted(TEMPLATES))
    q, sol, ans, meta = TEMPLATES[name](rng)
    return {"question": q, "solution": sol, "answer": int(ans), "template": name, "meta": meta}
