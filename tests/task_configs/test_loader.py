"""Small tasks of the other request types, written for the tests (no download, no corpus)."""

import datasets

QUESTIONS = [
    ("Which standard module serialises objects to JSON text?", ["json", "pickle", "array", "turtle"], 0),
    ("Which statement defines a function in Python?", ["class", "lambda", "def", "with"], 2),
    ("Which module runs a child process?", ["socket", "subprocess", "string", "struct"], 1),
    ("Which builtin returns the length of a list?", ["len", "sum", "max", "id"], 0),
    ("Which keyword leaves a loop early?", ["pass", "continue", "return", "break"], 3),
]

PROMPTS = [
    ("def add(a, b):\n    return", " a + b"),
    ("import os\n\ndef home():\n    return os.path.", "expanduser('~')"),
    ("for i in range(10):\n    print(", "i)"),
]


def multiple_choice(**kwargs):
    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]
    return {"test": datasets.Dataset.from_list(rows)}


def generation(**kwargs):
    rows = [{"prompt": p, "target": t} for p, t in PROMPTS]
    return {"test": datasets.Dataset.from_list(rows)}
