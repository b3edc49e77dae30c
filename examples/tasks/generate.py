"""Generate the example tasks' train/eval JSONL with a fixed seed.

    python examples/tasks/generate.py      # rewrites examples/tasks/*/{train,eval}.jsonl

Three tasks a 135M instruct model fails as asked (it answers in prose, not in the
required format) and a LoRA learns in minutes on CPU:
  ticket-routing  classify a support ticket into one of four fixed labels
  date-extract    pull the delivery date out of a message as YYYY-MM-DD
  order-json      turn a shop order into strict JSON {"item", "quantity", "express"}
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

SEED = 1234
TRAIN, EVAL = 400, 60
HERE = Path(__file__).resolve().parent

FIRST = [
    "Alice",
    "Bob",
    "Carla",
    "Deepak",
    "Elena",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jonas",
    "Kemi",
    "Luca",
    "Maya",
    "Noah",
    "Olga",
    "Pablo",
    "Quinn",
    "Rosa",
    "Sven",
    "Tara",
    "Umar",
    "Vera",
    "Wen",
    "Ximena",
    "Yusuf",
    "Zoe",
]
LAST = [
    "Smith",
    "Garcia",
    "Chen",
    "Okafor",
    "Novak",
    "Silva",
    "Kim",
    "Müller",
    "Rossi",
    "Haddad",
    "Larsen",
    "Patel",
    "Dubois",
    "Ivanova",
    "Tanaka",
    "Moreau",
]
CITIES = [
    "Paris",
    "Lagos",
    "Osaka",
    "Lima",
    "Oslo",
    "Denver",
    "Porto",
    "Hanoi",
    "Cairo",
    "Quito",
    "Perth",
    "Krakow",
    "Austin",
    "Leeds",
    "Bergen",
    "Seville",
]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]

ROUTING_PROMPT = (
    "Route this support ticket to exactly one team: billing, shipping, technical or account. "
    "Answer with the team name only.\n\nTicket: {ticket}"
)
TICKETS = {
    "billing": [
        "I was charged twice for my {item} this month.",
        "Why does my invoice show a fee I never agreed to?",
        "My credit card was billed {n} dollars more than the listed price.",
        "Can you explain the extra charge on my last statement?",
        "The payment for order {order} went through twice.",
        "I need a corrected invoice for my company, the VAT number is wrong.",
    ],
    "shipping": [
        "My {item} still has not arrived after {n} days.",
        "The tracking number for order {order} shows no movement.",
        "The courier left my package at the wrong address.",
        "Can I change the delivery address for order {order}?",
        "The box with my {item} arrived crushed and the parcel was open.",
        "How long does delivery to {city} usually take?",
    ],
    "technical": [
        "The app crashes every time I open the settings page.",
        "My {item} will not connect to wifi after the update.",
        "I get error code {n} when I try to sync my files.",
        "The screen of my {item} flickers after it warms up.",
        "The website shows a blank page when I click checkout.",
        "Firmware update {n} failed halfway and now the {item} does not boot.",
    ],
    "account": [
        "I cannot log in, the password reset email never comes.",
        "Please change the email address on my profile.",
        "How do I delete my account and all my data?",
        "Someone else seems to have access to my account.",
        "I want to merge my two accounts into one.",
        "My username shows as {name} but that is not me.",
    ],
}
ITEMS = ["headphones", "laptop", "blender", "phone", "camera", "router", "watch", "kettle"]

DATE_PROMPT = (
    "Extract the delivery date from the message. Answer with the date only, "
    "formatted as YYYY-MM-DD.\n\nMessage: {message}"
)
DATE_MESSAGES = [
    "Hi, my order should arrive on {date}, can you confirm?",
    "The courier said delivery is planned for {date}. I will be home.",
    "Please deliver on {date} instead of next week.",
    "We booked the delivery for {date}, around noon.",
    "Is {date} still the delivery date for order {order}?",
    "{name} here: the package is scheduled for {date}.",
]

ORDER_PROMPT = (
    'Convert the order to JSON with exactly the keys "item" (singular noun), "quantity" '
    '(integer) and "express" (true or false). Answer with the JSON only.\n\nOrder: {order}'
)
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
PLURALS = {
    "blender": "blenders",
    "kettle": "kettles",
    "lamp": "lamps",
    "chair": "chairs",
    "battery": "batteries",
    "box": "boxes",
    "knife": "knives",
    "mug": "mugs",
    "backpack": "backpacks",
    "candle": "candles",
    "towel": "towels",
    "brush": "brushes",
}
EXPRESS = [
    "as fast as possible",
    "with express shipping",
    "I need them by tomorrow",
    "overnight please",
    "it is urgent",
]
STANDARD = [
    "no rush",
    "standard shipping is fine",
    "whenever it suits you",
    "the cheapest delivery please",
    "there is no hurry",
]
ORDERS = [
    "Please send {qty} {item}, {speed}.",
    "I would like to order {qty} {item} ({speed}).",
    "Hi, {name} here. Can I get {qty} {item}? {speed_cap}.",
    "Order: {qty} {item}. Delivery: {speed}.",
]


def _name(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def routing(rng: random.Random) -> dict[str, str]:
    label = rng.choice(sorted(TICKETS))
    ticket = rng.choice(TICKETS[label]).format(
        item=rng.choice(ITEMS),
        n=rng.randint(2, 120),
        order=rng.randint(10000, 99999),
        city=rng.choice(CITIES),
        name=_name(rng),
    )
    return {"prompt": ROUTING_PROMPT.format(ticket=ticket), "completion": label}


def date_extract(rng: random.Random) -> dict[str, str]:
    year, month, day = rng.randint(2023, 2027), rng.randint(1, 12), rng.randint(1, 28)
    name = MONTHS[month - 1]
    written = rng.choice(
        [
            f"{name} {day}, {year}",
            f"{day} {name} {year}",
            f"{name[:3]} {day} {year}",
            f"{day}.{month}.{year}",
        ]
    )
    message = rng.choice(DATE_MESSAGES).format(
        date=written, order=rng.randint(10000, 99999), name=_name(rng)
    )
    return {
        "prompt": DATE_PROMPT.format(message=message),
        "completion": f"{year:04d}-{month:02d}-{day:02d}",
    }


def order_json(rng: random.Random) -> dict[str, object]:
    item = rng.choice(sorted(PLURALS))
    quantity = rng.randint(1, 10)
    express = rng.random() < 0.5
    speed = rng.choice(EXPRESS if express else STANDARD)
    written = rng.choice([NUMBERS[quantity - 1], str(quantity)])
    order = rng.choice(ORDERS).format(
        qty=written,
        item=item if quantity == 1 else PLURALS[item],
        speed=speed,
        speed_cap=speed[0].upper() + speed[1:],
        name=_name(rng),
    )
    answer = json.dumps({"item": item, "quantity": quantity, "express": express})
    # Chat format, to exercise both input formats.
    return {
        "messages": [
            {"role": "user", "content": ORDER_PROMPT.format(order=order)},
            {"role": "assistant", "content": answer},
        ]
    }


TASKS: dict[str, Callable[[random.Random], dict]] = {
    "ticket-routing": routing,
    "date-extract": date_extract,
    "order-json": order_json,
}


def _key(example: dict) -> str:
    return json.dumps(example, sort_keys=True)


def generate(task: str, make: Callable[[random.Random], dict], seed: int) -> None:
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    # Unique examples, so the held-out set never repeats a training example.
    while len(rows) < TRAIN + EVAL:
        example = make(rng)
        if _key(example) not in seen:
            seen.add(_key(example))
            rows.append(example)
    folder = HERE / task
    folder.mkdir(exist_ok=True)
    for name, part in (("train", rows[:TRAIN]), ("eval", rows[TRAIN:])):
        lines = [json.dumps(row, ensure_ascii=False) for row in part]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    for offset, (task, make) in enumerate(TASKS.items()):
        generate(task, make, SEED + offset)
        print(f"{task}: {TRAIN} train, {EVAL} eval")


if __name__ == "__main__":
    main()
