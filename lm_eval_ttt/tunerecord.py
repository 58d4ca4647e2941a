"""The tune record: which value of one method argument a comparison uses, and why.

One type for every module that crosses it: ``ttt-nn tune`` writes it (a value chosen on
validation documents, with each grid value's validation figures and cost), ``ttt-nn compare
--chosen`` writes one for a value given instead of tuned (recorded as not tuned), a harness
model reads it through ``tuned=PATH`` (and refuses a record whose value it does not use), and
``ttt-nn report`` labels rows from what the results recorded of it. The JSON file is written
once, atomically; a file that is not a tune record is one error naming it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from index_server.atomic import atomic_write

TUNED, GIVEN = "tuned", "given"  # how the value came about


class TuneRecordError(ValueError):
    """A file that is not a readable tune record."""


@dataclass(frozen=True)
class GridRow:
    """One grid value on the validation documents."""

    value: float | int | str
    bits_per_byte: float
    steps: int  # gradient steps over all validation documents
    seconds: float  # retrieval, training, scoring and resets of its documents (model loading excluded)
    curve: dict[str, float] | None = None  # with eval_at_k: validation bits per byte at each k


@dataclass(frozen=True)
class Validation:
    """The validation documents a value was chosen on."""

    count: int
    ids: tuple  # corpus ids (the index's own documents) or positions from 1 in ``file``
    index: str | None = None  # identity of the index that supplied or retrieved for them
    seed: int = 0
    file: str | None = None  # a held-out validation split, else the index's own corpus


@dataclass(frozen=True)
class TuneRecord:
    method: str  # the harness model
    param: str  # the argument, as the user spells it (``lambda``, ``lr``, ...)
    value: float | int | str  # the value runs use
    source: str = TUNED  # TUNED on validation documents, or GIVEN by the user (not tuned)
    reason: str = ""
    k: int | None = None  # the k it was tuned at (None: a method that retrieves nothing)
    args: dict = field(default_factory=dict)  # the other model arguments the grid ran with
    grid: tuple = ()  # as declared, before widening
    widened: tuple = ()  # values added past an edge of the grid
    rows: tuple[GridRow, ...] = ()
    validation: Validation | None = None
    budget: dict = field(default_factory=dict)  # the validation rule: docs, seed, min/max chars, widen, file

    @property
    def tuned(self) -> bool:
        return self.source == TUNED

    def describe(self) -> str:
        """How a report says where the value came from."""
        if not self.tuned:
            return f"{self.param}={self.value} given, not tuned" + (f" ({self.reason})" if self.reason else "")
        count = self.validation.count if self.validation else "?"
        return f"{self.param}={self.value} tuned on {count} validation docs"

    def to_json(self) -> dict:
        data = asdict(self)
        data["chosen"] = data.pop("value")  # the key tune.json files have always had
        return data

    def write(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(self.to_json(), indent=2, default=str) + "\n")
        return path

    @classmethod
    def from_json(cls, data: dict) -> TuneRecord:
        validation = data.get("validation")
        if validation is not None:
            validation = Validation(count=validation["count"], ids=tuple(validation["ids"]),
                                    index=validation.get("index"), seed=validation.get("seed", 0),
                                    file=validation.get("file"))
        config = data.get("config") or {}  # tune.json files written before the record had args and grid
        return cls(method=data["method"], param=data["param"], value=data["chosen"],
                   source=data.get("source", TUNED), reason=data.get("reason", ""), k=data.get("k"),
                   args=data.get("args", config.get("model_args", {})),
                   grid=tuple(data.get("grid", config.get("grid", ()))), widened=tuple(data.get("widened", ())),
                   rows=tuple(GridRow(**{k: v for k, v in row.items() if k in GridRow.__dataclass_fields__})
                              for row in data.get("rows", ())),
                   validation=validation, budget=data.get("budget", {}))

    @classmethod
    def read(cls, path: Path) -> TuneRecord:
        try:
            record = cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise TuneRecordError(f"{path}: not a tune record written by `ttt-nn tune` or `ttt-nn compare` "
                                  f"({type(e).__name__}: {e})") from e
        if record.tuned and record.validation is None:
            raise TuneRecordError(f"{path}: a tuned value without its validation documents")
        return record
