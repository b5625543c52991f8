"""Structured output requests: OpenAI's ``response_format`` and vLLM's guided-decoding fields, each
checked here and mapped to one ``SamplingParams.structured`` (``pdbus.messages.StructuredOutput``)
that the engine enforces with a grammar.

- ``response_format``: ``text`` (nothing), ``json_object`` (any JSON object), ``json_schema``
  (``{"json_schema": {"name", "schema", "strict"}}``: that schema).
- vLLM's fields, on both endpoints: ``guided_json`` / ``guided_regex`` / ``guided_choice`` /
  ``guided_grammar`` (vLLM < 0.10), or ``structured_outputs: {json, regex, choice, grammar,
  json_object}`` (vLLM >= 0.10). At most one of all these constrains a request.

Every schema, regex and grammar is checked before anything is reserved, so that a bad one is the
client's 400 and never an engine failure: a structural walk of the schema (types, sub-schemas,
``$ref`` pointers that resolve inside the document), then xgrammar's own converter when it is
installed (the engine's; it refuses what it could not follow).
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from pdbus.messages import StructuredOutput

from .errors import OpenAIError, check_free_form, invalid, short, type_name, unsupported

MAX_SCHEMA_DEPTH = 64  # nesting of a schema (or tools' parameters) as JSON
MAX_CHOICES = 1024
JSON_TYPES = ("string", "number", "integer", "boolean", "object", "array", "null")
GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")

# keywords whose value is one schema / a list of schemas / an object of schemas
_ONE = ("additionalProperties", "items", "not", "contains", "if", "then", "else", "propertyNames",
        "unevaluatedProperties", "unevaluatedItems", "additionalItems")  # fmt: skip
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_XGRAMMAR_NOISE = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")

@functools.cache
def _xgrammar():
    """The engine's grammar library, imported by the first request that needs it (a router that
    never sees one never loads it); None where it is not installed: the structural checks stand
    alone."""
    try:
        import xgrammar
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    return xgrammar


def xgrammar_message(exc: BaseException) -> str:
    """xgrammar's error in one line, without its C++ log prefix (``[12:00:00] /x.cc:83: Check
    failed: (...) is false:``); the frontend's 400s and the engine's failures both say it so."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _XGRAMMAR_NOISE.sub("", text)[:300]


def _resolve_ref(root: Any, ref: str, where: str) -> None:
    """A ``$ref`` must point inside the document (``#`` or ``#/a/b``): nothing is fetched."""
    if ref == "#":
        return
    if not ref.startswith("#/"):
        raise invalid(where, f"'{where}' has $ref {short(ref)}: only references inside the schema ('#/...') are supported.")
    node = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise invalid(where, f"'{where}' has $ref {short(ref)}, which points to nothing in the schema.")


def check_schema_structure(schema: Any, where: str) -> None:
    """The schema's shape, walked without recursion: every (sub-)schema an object or a boolean,
    types known, ``required`` / ``enum`` lists, counts non-negative integers, ``$ref`` resolvable."""
    check_free_form(where, schema, MAX_SCHEMA_DEPTH)
    stack = [(schema, "")]
    while stack:
        node, path = stack.pop()
        at = f"schema{path}"
        if isinstance(node, bool):
            continue
        if not isinstance(node, dict):
            raise invalid(where, f"'{where}': {at} must be an object or a boolean, got {type_name(node)}.")
        types = node.get("type")
        if types is not None:
            names = types if isinstance(types, list) else [types]
            bad = [t for t in names if t not in JSON_TYPES]
            if bad or not names:
                raise invalid(where, f"'{where}': {at} has unknown type {short(bad[0] if bad else types)} (known: {', '.join(JSON_TYPES)}).")
        required = node.get("required")
        if required is not None and not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
            raise invalid(where, f"'{where}': {at}.required must be a list of strings.")
        if "enum" in node and not (isinstance(node["enum"], list) and node["enum"]):
            raise invalid(where, f"'{where}': {at}.enum must be a non-empty list.")
        for key in _COUNTS:
            value = node.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise invalid(where, f"'{where}': {at}.{key} must be a non-negative integer, got {short(value)}.")
        ref = node.get("$ref")
        if ref is not None:
            if not isinstance(ref, str):
                raise invalid(where, f"'{where}': {at}.$ref must be a string.")
            _resolve_ref(schema, ref, where)
        for key in _ONE:
            if key in node:
                stack.append((node[key], f"{path}.{key}"))
        for key in _LIST:
            if key in node:
                value = node[key]
                if not isinstance(value, list) or not value:
                    raise invalid(where, f"'{where}': {at}.{key} must be a non-empty list of schemas.")
                stack.extend((v, f"{path}.{key}[{i}]") for i, v in enumerate(value))
        for key in _MAP:
            if key in node:
                value = node[key]
                if not isinstance(value, dict):
                    raise invalid(where, f"'{where}': {at}.{key} must be an object of schemas.")
                stack.extend((v, f"{path}.{key}.{k}") for k, v in value.items())


def json_schema_output(schema: Any, where: str) -> StructuredOutput:
    """``schema`` checked (structure, then xgrammar's converter) as the constraint of one request."""
    check_schema_structure(schema, where)
    text = json.dumps(schema, ensure_ascii=False)
    if (xgr := _xgrammar()) is not None:
        try:
            xgr.Grammar.from_json_schema(text)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise invalid(where, f"'{where}' is not a JSON schema this server can follow: {xgrammar_message(exc)}.") from None
    return StructuredOutput("json_schema", text)


def _regex_output(pattern: Any, where: str) -> StructuredOutput:
    if not isinstance(pattern, str) or not pattern:
        raise invalid(where, f"'{where}' must be a non-empty string (a regular expression).")
    check_free_form(where, pattern, 1)
    if (xgr := _xgrammar()) is not None:
        try:
            xgr.Grammar.from_regex(pattern)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise invalid(where, f"'{where}' is not a regular expression this server can follow: {xgrammar_message(exc)}.") from None
    else:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise invalid(where, f"'{where}' is not a regular expression: {exc}.") from None
    return StructuredOutput("regex", pattern)


def _grammar_output(grammar: Any, where: str) -> StructuredOutput:
    if not isinstance(grammar, str) or not grammar.strip():
        raise invalid(where, f"'{where}' must be a non-empty string (an EBNF grammar with a 'root' rule).")
    check_free_form(where, grammar, 1)
    if (xgr := _xgrammar()) is not None:
        try:
            xgr.Grammar.from_ebnf(grammar)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise invalid(where, f"'{where}' is not an EBNF grammar this server can follow: {xgrammar_message(exc)}.") from None
    elif not re.search(r"(^|\n)\s*root\s*::=", grammar):
        raise invalid(where, f"'{where}' has no 'root ::= ...' rule.")
    return StructuredOutput("ebnf", grammar)


def _choice_output(choices: Any, where: str) -> StructuredOutput:
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise invalid(where, f"'{where}' must be a non-empty list of non-empty strings.")
    if len(choices) > MAX_CHOICES:
        raise invalid(where, f"'{where}' must hold at most {MAX_CHOICES} strings, got {len(choices)}.")
    check_free_form(where, choices, 2)
    return StructuredOutput("choice", json.dumps(list(dict.fromkeys(choices)), ensure_ascii=False))


def _json_value(value: Any, where: str) -> StructuredOutput:
    """vLLM's ``guided_json`` / ``structured_outputs.json``: a schema, or a schema as JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise invalid(where, f"'{where}' is a string that is not JSON: {exc}.") from None
    return json_schema_output(value, where)


def parse_response_format(value: Any) -> StructuredOutput | None:
    """OpenAI's ``response_format`` (``value`` present and not null)."""
    where = "response_format"
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise invalid(where, "'response_format' must be an object with a string 'type'.")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind != "json_schema":
        raise unsupported(where, f"response_format type {short(kind)} (supported: text, json_object, json_schema)")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise invalid(f"{where}.json_schema", "'response_format.json_schema' must be an object with a 'schema'.")
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise invalid(f"{where}.json_schema.name", "'response_format.json_schema.name' must be a string.")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise invalid(f"{where}.json_schema.strict", "'response_format.json_schema.strict' must be a boolean.")
    if "schema" not in spec or spec["schema"] is None:
        raise invalid(f"{where}.json_schema.schema", "'response_format.json_schema.schema' is required.")
    return json_schema_output(spec["schema"], "response_format.json_schema.schema")


def parse_guided(values: dict[str, Any]) -> StructuredOutput | None:
    """vLLM's guided-decoding fields, given as ``{name: value}`` of those present (not null)."""
    found: list[tuple[str, StructuredOutput]] = []
    makers = {"json": _json_value, "regex": _regex_output, "choice": _choice_output, "grammar": _grammar_output}
    for name, value in values.items():
        if name == "structured_outputs":
            if not isinstance(value, dict):
                raise invalid(name, "'structured_outputs' must be an object (json, regex, choice, grammar or json_object).")
            for key, inner in value.items():
                where = f"structured_outputs.{key}"
                if inner is None or key in ("disable_fallback", "disable_any_whitespace", "disable_additional_properties", "whitespace_pattern"):
                    continue
                if key == "json_object":
                    if not isinstance(inner, bool):
                        raise invalid(where, f"'{where}' must be a boolean.")
                    if inner:
                        found.append((where, StructuredOutput("json_object")))
                elif key in makers:
                    found.append((where, makers[key](inner, where)))
                else:
                    raise unsupported(where, f"'{where}'")
        elif name.startswith("guided_"):
            found.append((name, makers[name.removeprefix("guided_")](value, name)))
    if len(found) > 1:
        raise OpenAIError(
            f"Only one structured output constraint may be given, got {', '.join(w for w, _ in found)}.", param=found[1][0]
        )
    return found[0][1] if found else None



def as_request_field(so: StructuredOutput) -> dict:
    """A ``StructuredOutput`` as vLLM's ``structured_outputs`` field (a bus client's ``Generate``
    becomes an HTTP body and takes the same checks)."""
    if so.kind == "json_object":
        return {"json_object": True}
    key = {"json_schema": "json", "regex": "regex", "ebnf": "grammar", "choice": "choice"}.get(so.kind)
    if key is None:
        raise invalid("structured", f"'structured.kind' must be one of json_object, json_schema, regex, ebnf, choice; got {short(so.kind)}.")
    if key in ("json", "choice"):
        try:
            return {key: json.loads(so.spec)}
        except json.JSONDecodeError as exc:
            raise invalid("structured", f"'structured.spec' is not JSON: {exc}.") from None
    return {key: so.spec}
