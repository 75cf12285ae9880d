"""The OpenAPI schemas of the messages the API reads and writes, generated from the installed pydantic-ai.

- `UIMessage`: an AI SDK UI message, as pydantic-ai's Vercel AI adapter reads it (the chat body's messages) and as a
  conversation is read in the `vercel` format;
- `ModelMessage`: pydantic-ai's own message (a `ModelRequest` or a `ModelResponse`), as a conversation is read in the
  `pydantic` format.

Each comes with the schemas of its parts' kinds (text, files, tool calls and results, ...). A generated client types
the messages it sends and reads, and a request generated from the document (schemathesis) sends parts of every kind.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic_ai.ui.vercel_ai.request_types import UIMessage

from agentrt.services.message_json import message_adapter

UI_MESSAGE = 'UIMessage'
"""The OpenAPI schema of a message of the chat body, and of a conversation read in the `vercel` format."""

MODEL_MESSAGE = 'ModelMessage'
"""The OpenAPI schema of a message of a conversation read in the `pydantic` format."""

_REF = '#/components/schemas/{model}'

_TIME = r'T(?:[0-9]+H(?:[0-9]+M)?(?:[0-9]+(?:\.[0-9]+)?S)?|[0-9]+M(?:[0-9]+(?:\.[0-9]+)?S)?|[0-9]+(?:\.[0-9]+)?S)'
# At least one component after `P` and after `T` (`P`, `PT`, `P1DT` are not durations), without lookarounds:
# schemathesis generates strings from the pattern, and not every generator takes them.
ISO_DURATION = rf'^-?P(?:[0-9]+D(?:{_TIME})?|{_TIME})$'
"""A duration as pydantic writes it (ISO 8601: `PT0.010479S`, `P1DT2H3M4.5S`, `-PT1S`)."""


def schema_ref(name: str) -> dict[str, Any]:
    """A reference to the document's schema `name`."""
    return {'$ref': _REF.format(model=name)}


def message_schemas() -> dict[str, Any]:
    """`UIMessage` and `ModelMessage` with the schemas they refer to, by name, as the document's schemas hold them.

    Raises:
        RuntimeError: the two name a schema alike.
    """
    ui = UIMessage.model_json_schema(by_alias=True, ref_template=_REF)
    # Serialisation mode: the schema of what the API writes (`message_adapter.dump_json`), the bytes of a file as text.
    model = message_adapter.json_schema(mode='serialization', by_alias=True, ref_template=_REF)
    ui, model = iso_durations(ui), iso_durations(model)
    ui_parts, model_parts = ui.pop('$defs', {}), model.pop('$defs', {})
    shared = set(ui_parts) & set(model_parts)
    if shared:
        raise RuntimeError(f'OpenAPI: pydantic-ai names the schemas {sorted(shared)} in UIMessage and ModelMessage')
    return {**ui_parts, **model_parts, UI_MESSAGE: ui, MODEL_MESSAGE: model}


def iso_durations(schema: Any) -> Any:
    """`schema` with each string of `format: duration` given the pattern of what pydantic writes instead.

    pydantic declares a `timedelta` (a response's `duration`) as JSON Schema's `duration` format, whose grammar (RFC
    3339 appendix A) has neither fractions of a second nor a sign, and writes `PT0.010479S`: a response checked with
    formats asserted (schemathesis) read as not what the document says.
    """
    if isinstance(schema, list):
        return [iso_durations(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: iso_durations(value) for key, value in schema.items()}
    if schema.get('format') == 'duration' and schema.get('type') == 'string':
        del schema['format']
        schema['pattern'] = ISO_DURATION
    return schema


def document_messages(app: FastAPI) -> None:
    """Have `app`'s OpenAPI document hold `message_schemas()` among its schemas, where its routes refer to them.

    Raises:
        RuntimeError: (when the document is made) one of those schemas has the name of one of the API's own.
    """
    make = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = make()
            schemas = document.setdefault('components', {}).setdefault('schemas', {})
            for name, schema in message_schemas().items():
                if name in schemas:
                    raise RuntimeError(f'OpenAPI: pydantic-ai names a schema {name!r} as the API does')
                schemas[name] = schema
        return app.openapi_schema  # type: ignore[return-value]  # set by `make()`

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to amend the document
