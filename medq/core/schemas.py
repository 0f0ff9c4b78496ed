"""Extraction schemas: ``configs/schemas/NAME.yaml`` -> JSON Schema + pydantic model.

The YAML format is CONTRACT.md's. Each file is checked when it is loaded, so a
typo is reported at worker start with the file and field named, not at the first job.
A bad file disables only its own schema: the loader keeps the others and remembers
the file and why (``SchemaLoader.problems``); asking for that schema raises it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from medq.core.errors import SchemaError, SchemaVersionUnavailable, UnknownSchema
from medq.core.settings import get_settings

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_SCALARS: dict[str, Any] = {"string": str, "integer": int, "number": float, "boolean": bool}
_KNOWN_TYPES = (*_SCALARS, "null", "array", "object")


@dataclass(frozen=True)
class ExtractionSchema:
    name: str
    version: int
    description: str
    instructions: str
    fields: dict[str, dict[str, Any]]
    json_schema: dict[str, Any]
    model: type[BaseModel]
    path: Path | None = None
    field_names: tuple[str, ...] = field(default=())
    examples: tuple[dict[str, Any], ...] = ()  # few-shot pairs {"text", "data"}, checked against the model

    def validate_json(self, raw: str | bytes) -> BaseModel:
        """Parse and validate a model answer; raises pydantic's ValidationError."""
        return self.model.model_validate_json(raw)


@dataclass(frozen=True)
class SchemaFileProblem:
    """A schema file that could not be loaded: ``name`` is the schema it declares, or the
    file name up to its first dot when it cannot be read that far."""

    path: Path
    name: str
    message: str  # SchemaError's: the file, the line or field, and what is wrong

    def __str__(self) -> str:
        return self.message


class SchemaLoader:
    """Loads every ``*.yaml`` in ``dirs`` once; later folders override earlier ones.

    Several versions of one schema load side by side (``lab_report.yaml`` at version 2
    beside ``lab_report.v1.yaml`` at version 1): a job runs under the version it was
    enqueued with, so a rolling schema upgrade never labels v2's answer as v1. New jobs
    get the highest version."""

    def __init__(self, dirs: Iterable[Path | str] | None = None) -> None:
        if dirs is None:
            dirs = get_settings().schema_dirs
        self.dirs = [Path(d) for d in dirs]
        self._schemas: dict[str, dict[int, ExtractionSchema]] = {}
        self.problems: list[SchemaFileProblem] = []  # bad files, each disabling its own schema only
        for d in self.dirs:
            if not d.is_dir():
                continue
            for path in sorted(d.glob("*.yaml")) + sorted(d.glob("*.yml")):
                try:
                    schema = load_schema_file(path)
                except SchemaError as exc:
                    self.problems.append(SchemaFileProblem(path, _declared_name(path), exc.message))
                    continue
                self._schemas.setdefault(schema.name, {})[schema.version] = schema

    def problem_for(self, name: str) -> SchemaFileProblem | None:
        """The bad file that declares (or is named after) schema ``name``, if any."""
        return next((p for p in self.problems if p.name == name), None)

    def names(self) -> list[str]:
        return sorted(self._schemas)

    def all(self) -> list[ExtractionSchema]:
        """The newest version of each schema, by name."""
        return [self.get(n) for n in self.names()]

    def all_versions(self) -> list[ExtractionSchema]:
        return [self._schemas[n][v] for n in self.names() for v in sorted(self._schemas[n])]

    def pairs(self) -> list[tuple[str, int]]:
        """Every loaded ``(name, version)``: what a worker with this loader can run."""
        return [(s.name, s.version) for s in self.all_versions()]

    def versions(self, name: str) -> list[int]:
        return sorted(self._schemas.get(name, {}))

    def get(self, name: str, version: int | None = None) -> ExtractionSchema:
        """The schema ``name`` at ``version`` (default: the newest loaded). Raises
        ``UnknownSchema``, or ``SchemaVersionUnavailable`` for a version not loaded here."""
        versions = self._schemas.get(name)
        broken = self.problem_for(name)
        if broken is not None and (version is None or version not in (versions or {})):
            raise _unusable(name, version, broken)
        if not versions:
            known = ", ".join(self.names()) or "none (check configs/schemas and MEDQ_SCHEMAS_DIRS)"
            raise UnknownSchema(f"unknown schema {name!r}; known schemas: {known}")
        if version is None:
            return versions[max(versions)]
        try:
            return versions[version]
        except KeyError:
            loaded = ", ".join(str(v) for v in sorted(versions))
            raise SchemaVersionUnavailable(
                f"schema {name} version {version} is not loaded here (this worker has version {loaded}); "
                f"a worker that has it will take the job. Keep the old file (e.g. {name}.v{version}.yaml) "
                "beside the new one until its jobs are done"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._schemas


def _unusable(name: str, version: int | None, broken: SchemaFileProblem) -> SchemaError | SchemaVersionUnavailable:
    if version is None:  # new jobs: never quietly an older version while the newest file is broken
        return SchemaError(f"schema {name!r} cannot be used until its file is fixed: {broken.message}")
    # a job enqueued before the file broke: put back for a worker that has it (or this one, fixed)
    return SchemaVersionUnavailable(
        f"schema {name} version {version} is not loaded here: this worker could not load {broken.message}"
    )


def _declared_name(path: Path) -> str:
    """The ``name:`` a bad schema file declares, if it can be read that far; else its file name."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        doc = None
    name = doc.get("name") if isinstance(doc, dict) else None
    return name if isinstance(name, str) and name else path.name.split(".")[0]


def load_schema_file(path: Path) -> ExtractionSchema:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f", line {mark.line + 1}" if mark is not None else ""
        raise SchemaError(f"{path}{line}: not valid YAML: {exc.problem or exc.context}") from None
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SchemaError(f"{path}: cannot read schema file: {exc}") from None
    return build_schema(doc, source=path)


def build_schema(doc: Any, source: Path | str = "<schema>") -> ExtractionSchema:
    """Check a schema document and build its JSON Schema and pydantic model."""
    where = str(source)
    if not isinstance(doc, dict):
        raise SchemaError(f"{where}: expected a mapping with name, version and fields")
    name = doc.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise SchemaError(f"{where}: 'name' must be lower_snake_case, got {name!r}")
    version = doc.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SchemaError(f"{where}: 'version' must be a positive integer, got {version!r}")
    fields = doc.get("fields")
    if not isinstance(fields, dict) or not fields:
        raise SchemaError(f"{where}: 'fields' must be a non-empty mapping of field name -> property")
    for key in ("description", "instructions"):
        if doc.get(key) is not None and not isinstance(doc.get(key), str):
            raise SchemaError(f"{where}: {key!r} must be text")

    annotations: dict[str, Any] = {}
    properties: dict[str, Any] = {}
    for fname, prop in fields.items():
        if not isinstance(fname, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", fname):
            raise SchemaError(f"{where}: field name {fname!r} must be an identifier")
        path = f"{where}: field {fname!r}"
        py_type = _python_type(prop, path, model_name=f"{_camel(name)}_{fname}")
        annotations[fname] = (py_type, ...)
        properties[fname] = _clean_property(prop)

    model = create_model(
        _camel(name),
        __config__=ConfigDict(extra="ignore"),
        **annotations,
    )
    json_schema = {
        "type": "object",
        "properties": properties,
        "required": list(fields),
        "additionalProperties": False,
    }
    examples = _check_examples(doc.get("examples"), model, where)
    return ExtractionSchema(
        name=name,
        version=version,
        description=(doc.get("description") or "").strip(),
        instructions=(doc.get("instructions") or "").strip(),
        fields=properties,
        json_schema=json_schema,
        model=model,
        path=Path(source) if isinstance(source, Path) else None,
        field_names=tuple(fields),
        examples=examples,
    )


def _check_examples(raw: Any, model: type[BaseModel], where: str) -> tuple[dict[str, Any], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise SchemaError(f"{where}: 'examples' must be a list of {{text, data}}")
    out = []
    for i, ex in enumerate(raw, start=1):
        if not isinstance(ex, dict) or not isinstance(ex.get("text"), str) or not isinstance(ex.get("data"), dict):
            raise SchemaError(f"{where}: example {i} needs 'text' (the note) and 'data' (the answer)")
        try:
            data = model.model_validate(ex["data"]).model_dump(mode="json")
        except ValidationError as exc:
            locs = ", ".join(".".join(str(p) for p in e["loc"]) for e in exc.errors(include_input=False))
            raise SchemaError(f"{where}: example {i}: 'data' does not follow the fields ({locs})") from None
        out.append({"text": ex["text"], "data": data})
    return tuple(out)


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_")) or "Schema"


def _types_of(prop: dict[str, Any], path: str) -> list[str]:
    t = prop.get("type")
    if t is None and "enum" in prop:
        return []
    types = t if isinstance(t, list) else [t]
    for one in types:
        if one not in _KNOWN_TYPES:
            raise SchemaError(f"{path}: unknown type {one!r} (use one of {', '.join(_KNOWN_TYPES)})")
    return [str(one) for one in types]


def _python_type(prop: Any, path: str, model_name: str) -> Any:
    if not isinstance(prop, dict):
        raise SchemaError(f"{path}: expected a mapping like {{type: string}}, got {prop!r}")
    types = _types_of(prop, path)
    nullable = "null" in types
    if "enum" in prop:
        values = prop["enum"]
        if not isinstance(values, list) or not values:
            raise SchemaError(f"{path}: 'enum' must be a non-empty list")
        if None in values:
            nullable = True
        literals = tuple(v for v in values if v is not None)
        if not literals:
            raise SchemaError(f"{path}: 'enum' needs at least one non-null value")
        base: Any = Literal[literals]
    else:
        non_null = [t for t in types if t != "null"]
        if not non_null:
            raise SchemaError(f"{path}: needs a type other than null")
        parts = [_one_type(t, prop, path, model_name) for t in non_null]
        # Types built at run time from values: typing's Union takes a tuple of any length, and
        # Optional/Union keep the annotations pydantic has always been given here.
        base = parts[0] if len(parts) == 1 else Union[tuple(parts)]  # noqa: UP007
    return Optional[base] if nullable else base  # noqa: UP045


def _one_type(t: str, prop: dict[str, Any], path: str, model_name: str) -> Any:
    if t in _SCALARS:
        return _SCALARS[t]
    if t == "array":
        items = prop.get("items")
        if items is None:
            raise SchemaError(f"{path}: an array needs 'items'")
        return list[_python_type(items, f"{path}[items]", model_name + "_item")]  # type: ignore[misc]
    # object
    props = prop.get("properties")
    if not isinstance(props, dict) or not props:
        raise SchemaError(f"{path}: an object needs 'properties'")
    required = prop.get("required", list(props))
    if not isinstance(required, list) or any(r not in props for r in required):
        raise SchemaError(f"{path}: 'required' must list names from 'properties'")
    sub: dict[str, Any] = {}
    for pname, pprop in props.items():
        ptype = _python_type(pprop, f"{path}.{pname}", f"{model_name}_{pname}")
        sub[pname] = (ptype, ...) if pname in required else (Optional[ptype], None)  # noqa: UP045 (built at run time)
    return create_model(model_name, __config__=ConfigDict(extra="ignore"), **sub)


def _clean_property(prop: dict[str, Any]) -> dict[str, Any]:
    """The property as JSON Schema: objects get ``additionalProperties: false`` and
    all their keys required, which constrained decoders need to terminate."""
    out: dict[str, Any] = json.loads(json.dumps(prop))  # deep copy, and proof it is JSON-able
    _close_objects(out)
    return out


def _close_objects(node: Any) -> None:
    if isinstance(node, dict):
        t = node.get("type")
        types = t if isinstance(t, list) else [t]
        if "object" in types and "properties" in node:
            node.setdefault("additionalProperties", False)
            node.setdefault("required", list(node["properties"]))
        for v in node.values():
            _close_objects(v)
    elif isinstance(node, list):
        for v in node:
            _close_objects(v)
