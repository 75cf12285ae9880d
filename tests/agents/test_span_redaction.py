"""`UrlRedaction`: the URL attributes of a span are redacted as it starts, percent-encoded secrets included."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agentrt.agents.span_redaction import UrlRedaction

SECRET = 'sk-proj-aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7'


@pytest.mark.parametrize(
    ('attribute', 'value', 'expected'),
    [
        ('url.path', f'/api/v1/conversations/{SECRET}', '/api/v1/conversations/[REDACTED]'),
        ('url.query', f'api_key={SECRET}', 'api_key=[REDACTED]'),
        # A percent-escape before the key ('%20', '%3A': a client's encoded space or colon) hid it from every rule.
        ('url.query', f'q=my%20key%20{SECRET}&x=1', 'q=my%20key%20[REDACTED]&x=1'),
        ('http.target', f'/api/v1/me?t=Bearer%3A{SECRET}', '/api/v1/me?t=Bearer%3A[REDACTED]'),
        ('url.query', 'q=caf%C3%A9%20and%20%25', 'q=caf%C3%A9%20and%20%25'),  # nothing secret: left as it came
    ],
)
def test_a_spans_url_is_redacted_even_percent_encoded(attribute: str, value: str, expected: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(UrlRedaction())
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    with provider.get_tracer('test').start_as_current_span('GET', attributes={attribute: value}):
        pass

    [span] = exporter.get_finished_spans()
    assert span.attributes is not None and span.attributes[attribute] == expected
