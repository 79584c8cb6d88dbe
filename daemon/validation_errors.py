"""One way to say what is wrong with a config, a request or an ai-toolkit run: pydantic errors as
"dotted.key: message (got value)" lines, with a "did you mean" hint for a misspelt key.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

MAX_SHOWN = 80
"""Longest rendering of a wrong value; longer ones are cut (a base64 image, a pasted prompt)."""


def show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN - 3] + "..."


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """"; did you mean 'x'?" for the closest known name, or "" when none is close."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def format_validation_error(exc: ValidationError, model: type[BaseModel] | None = None, *, where: str = "",
                            explain: Callable[[ErrorDetails], str | None] | None = None) -> list[str]:
    """Every error of `exc` as "where.dotted.loc: message (got value)".

    `model` (the validated class) names the keys an unknown one may be a typo of; `explain` may
    replace pydantic's message for errors a caller can say better.
    """
    lines = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"])
        loc = ".".join(p for p in (where, loc) if p) or "(top level)"
        msg = (explain(err) if explain else None) or err["msg"]
        if err["type"] == "extra_forbidden" and model is not None:
            known = _fields_at(model, err["loc"][:-1])
            msg = "unknown field (extra_forbidden)" + did_you_mean(str(err["loc"][-1]), known)
        shown = err["type"] in ("missing", "extra_forbidden") or isinstance(err.get("input"), (dict, list))
        if not shown and "(got " not in msg:  # a validator's own message may name the value already
            msg += f" (got {show(err.get('input'))})"
        lines.append(f"{loc}: {msg}")
    return lines


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names valid at `loc` below `model`, through nested models, optionals, lists and dicts."""
    annotation: Any = model
    for part in loc:
        annotation = _step(annotation, part)
        if annotation is None:
            return []
    annotation = _step(annotation, None)
    return list(annotation.model_fields) if _is_model(annotation) else []


def _step(annotation: Any, part: Any) -> Any:
    """The annotation one loc part below `annotation` (`part` None: only unwrap optionals)."""
    if _is_model(annotation):
        if part is None:
            return annotation
        field = annotation.model_fields.get(str(part))
        return field.annotation if field is not None else None
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (list, tuple, dict) and args and part is not None:
        return args[-1] if origin is not tuple else args[0]
    if args and origin not in (list, tuple, dict):  # X | None, Optional[X], Annotated[X, ...]
        models = [a for a in args if _is_model(a) or get_args(a)]
        return _step(models[0], part) if models else None
    return None


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)
