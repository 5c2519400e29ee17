"""The registry of served models: engine name (and aliases) -> :class:`Model`."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

from fastpilot.engine.model import Model
from fastpilot.errors import ModelLoading, UnknownModel


class Registry:
    """Served models by name. Thread-safe; the first model added is the default.

    ``loading`` is True while the server is still loading models (``/health``
    answers 503 and requests raise ModelLoading until one is registered).
    Copilot invents engine names, so :meth:`get` maps an unknown name to the
    default model unless ``strict``.
    """

    def __init__(self) -> None:
        self._models: dict[str, Model] = {}  # primary name -> model, insertion ordered
        self._names: dict[str, str] = {}  # every served name or alias -> primary name
        self._lock = threading.Lock()
        self.loading = False

    def add(self, name: str, model: Model, *, aliases: Iterable[str] = ()) -> None:
        """Serve ``model`` as ``name`` and its aliases; a name may be taken once."""
        with self._lock:
            for key in (name, *aliases):
                if key in self._names:
                    raise ValueError(
                        f"model name {key!r} is already served by {self._names[key]!r}"
                    )
            self._models[name] = model
            self._names[name] = name
            for alias in aliases:
                self._names[alias] = name

    def get(self, name: str | None = None, *, strict: bool = False) -> Model:
        """The model served as ``name``; None or ``""`` means the default.

        Raises:
            UnknownModel: ``strict`` and the name is not served (the message lists the names).
            ModelLoading: nothing is registered yet while ``loading``.
        """
        with self._lock:
            if not self._models:
                if self.loading:
                    raise ModelLoading("the model is still loading; retry shortly")
                raise UnknownModel("no model is loaded", param="model")
            if name:
                primary = self._names.get(name)
                if primary is not None:
                    return self._models[primary]
                if strict:
                    raise UnknownModel(
                        f"the model {name!r} does not exist; served: {', '.join(self._names)}",
                        param="model",
                    )
            return next(iter(self._models.values()))

    @property
    def default(self) -> Model | None:
        with self._lock:
            return next(iter(self._models.values()), None)

    def names(self, *, aliases: bool = False) -> list[str]:
        """Primary names in the order added (with ``aliases``: every served name)."""
        with self._lock:
            return list(self._names if aliases else self._models)

    def aliases_of(self, name: str) -> list[str]:
        with self._lock:
            return [a for a, p in self._names.items() if p == name and a != name]

    def __iter__(self) -> Iterator[Model]:
        with self._lock:
            models = list(self._models.values())
        return iter(models)

    def __len__(self) -> int:
        with self._lock:
            return len(self._models)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._names

    def close_all(self) -> None:
        """Close every model (stops the backends' workers); the registry is empty after."""
        with self._lock:
            models = list(self._models.values())
            self._models.clear()
            self._names.clear()
        for model in models:
            model.close()
