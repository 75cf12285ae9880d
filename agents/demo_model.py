"""The offline `demo` model: a deterministic, scripted planner built on pydantic-ai's `FunctionModel`.

It is not a language model. It recognises directory criteria in the user's message (specialty,
city, insurance, produce category, ...) from a fixed vocabulary and plays a three-step script:

1. one response asking for several `search_directory` calls at once: the full search plus one
   search per relaxed criterion (so pydantic-ai runs them in parallel);
2. one response asking for `get_directory_entry` on the top matches, again in parallel;
3. an answer written only from the tool results.

Usage is estimated by `FunctionModel` (it counts words). A streamed response counts its input as a plain one does
(`FunctionModel`'s streams alone count 50 tokens of input whatever was sent); their output counts differ a little (a
plain response also counts the earlier responses it was sent as output, as `FunctionModel` does).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from pydantic_ai import ModelResponse, TextPart, ToolCallPart
from pydantic_ai.messages import ModelMessage, ModelRequest, ToolReturnPart, UserPromptPart
from pydantic_ai.models import ModelRequestParameters, StreamedResponse
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel
from pydantic_ai.settings import ModelSettings
from pydantic_ai.tools import RunContext
from pydantic_ai.usage import RequestUsage

from agentrt.services import demo_data as vocab

DEMO_MODEL_NAME = 'demo'
SCHEMAS_LINE = 'Directories you can search:'
NO_SCHEMAS = 'none configured'
"""What the schemas line says for an account without a directory."""
TOP_DETAILS = 3

# (stem to look for in the lower-cased message, canonical value); first match wins, so specific stems go first.
_SPECIALTY_STEMS = [
    ('cardiolog', 'Cardiology'), ('heart', 'Cardiology'), ('dermatolog', 'Dermatology'), ('skin', 'Dermatology'),
    ('family', 'Family Medicine'), ('primary care', 'Family Medicine'), ('pediatric', 'Pediatrics'),
    ('orthop', 'Orthopedics'), ('neurolog', 'Neurology'), ('oncolog', 'Oncology'), ('cancer', 'Oncology'),
    ('psychiatr', 'Psychiatry'), ('obstetric', 'Obstetrics and Gynecology'), ('gynecolog', 'Obstetrics and Gynecology'),
    ('ob-gyn', 'Obstetrics and Gynecology'), ('ophthalmolog', 'Ophthalmology'), ('eye', 'Ophthalmology'),
    ('endocrin', 'Endocrinology'), ('diabet', 'Endocrinology'), ('gastro', 'Gastroenterology'),
]  # fmt: skip
_PRODUCE_STEMS = [
    ('root veg', 'Root Vegetables'), ('carrot', 'Root Vegetables'), ('potato', 'Root Vegetables'),
    ('leafy', 'Leafy Greens'), ('lettuce', 'Leafy Greens'), ('spinach', 'Leafy Greens'), ('berr', 'Berries'),
    ('citrus', 'Citrus'), ('orange', 'Citrus'), ('lemon', 'Citrus'), ('mushroom', 'Mushrooms'), ('herb', 'Herbs'),
    ('vegetable', 'Vegetables'), ('fruit', 'Fruit'),
]  # fmt: skip
_CERTIFICATION_STEMS = [
    ('organic', 'USDA Organic'), ('fair trade', 'Fair Trade'), ('non-gmo', 'Non-GMO'), ('gmo-free', 'Non-GMO'),
    ('global', 'GlobalG.A.P.'), ('rainforest', 'Rainforest Alliance'),
]  # fmt: skip
_DAY_STEMS = [(name.lower(), name) for name in vocab.DELIVERY_DAYS] + [
    ('monday', 'Mon'), ('tuesday', 'Tue'), ('wednesday', 'Wed'), ('thursday', 'Thu'), ('friday', 'Fri'),
    ('saturday', 'Sat'),
]  # fmt: skip
_STOP_WORDS = set(
    'a an and any are can find for from get give i in is me my near of on or please show some the to who with '
    'which what where that accept accepts accepting take takes looking need want doctors doctor providers '
    'suppliers supplier'.split()
)


@dataclass
class Plan:
    """What the planner understood from a message."""

    schema: str | None
    filters: dict[str, str | bool] = field(default_factory=dict)
    query: str | None = None


def plan_for(message: str, schemas: list[str]) -> Plan:
    """Recognise the directory and criteria in `message`, restricted to the account's `schemas`."""
    text = message.lower()
    medical: dict[str, str | bool] = {}
    produce: dict[str, str | bool] = {}
    if specialty := _first(text, _SPECIALTY_STEMS):
        medical['specialty'] = specialty
    if insurance := _first(text, [(p.lower(), p) for p in vocab.INSURANCE_PLANS]):
        medical['insurance'] = insurance
    if language := _first(text, [(lang.lower(), lang) for lang in vocab.LANGUAGES[1:]]):
        medical['language'] = language
    if 'new patient' in text:
        medical['accepting_new_patients'] = True
    if category := _first(text, _PRODUCE_STEMS):
        produce['category'] = category
    if certification := _first(text, _CERTIFICATION_STEMS):
        produce['certification'] = certification
    if day := _first(text, _DAY_STEMS, whole_word=True):
        produce['delivery_day'] = day
    candidates = [
        (vocab.MEDICAL_SCHEMA, medical, vocab.MEDICAL_CITIES),
        (vocab.PRODUCE_SCHEMA, produce, vocab.PRODUCE_CITIES),
    ]
    candidates.sort(key=lambda c: (c[0] in schemas, len(c[1])), reverse=True)
    schema, filters, cities = candidates[0]
    if schema not in schemas:
        return Plan(schema=schemas[0] if schemas else None, query=_keywords(message))
    if city := _first(text, [(c.lower(), c) for c in cities]):
        filters = {**filters, 'city': city}
    return Plan(schema=schema, filters=filters, query=None if filters else _keywords(message))


def _first(text: str, stems: list[tuple[str, str]], *, whole_word: bool = False) -> str | None:
    for stem, value in stems:
        pattern = rf'\b{re.escape(stem)}\b' if whole_word else rf'\b{re.escape(stem)}'
        if re.search(pattern, text):
            return value
    return None


def _keywords(message: str) -> str | None:
    words = [w for w in re.findall(r"[a-zA-Z][a-zA-Z'-]+", message.lower()) if w not in _STOP_WORDS]
    return ' '.join(words[:8]) or None


def _schemas_from(info: AgentInfo) -> list[str]:
    match = re.search(rf'{re.escape(SCHEMAS_LINE)}\s*([^\n.]+)', info.instructions or '')
    names = [s.strip() for s in match.group(1).split(',') if s.strip()] if match else []
    return [] if names == [NO_SCHEMAS] else names


# --- the script -------------------------------------------------------------------------------------------------


def _turn_messages(messages: list[ModelMessage]) -> tuple[list[str], list[ToolReturnPart]]:
    """The user prompts in order (the latest last; their count is its turn number), and the tool returns since the
    latest (retried calls included)."""
    prompts: list[str] = []
    parts: list[ToolReturnPart] = []
    for message in messages:
        if not isinstance(message, ModelRequest):
            continue
        for part in message.parts:
            if isinstance(part, UserPromptPart) and isinstance(part.content, str):
                prompts, parts = [*prompts, part.content], []
            elif isinstance(part, ToolReturnPart):
                parts.append(part)
    return prompts, parts


_FOLLOW_UP = re.compile(r'\s*(and|also|what about|how about|same)\b', re.IGNORECASE)


def plan_for_conversation(prompts: list[str], schemas: list[str]) -> Plan:
    """The plan for the latest of `prompts`, with a follow-up's missing criteria taken from the questions before it.

    A follow-up ("and in Denver?", "what about Aetna?", or a message of three words or fewer) that names a single
    criterion keeps the previous question's others ("Dermatologists in Boston", then "and in Denver?": dermatologists
    in Denver); any other message is planned on its own, as a first question is.
    """
    # Back from the latest prompt while each is a follow-up naming one criterion: the first that is not is planned on
    # its own, so the prompts before it cannot matter (a full question is planned once, not its whole history's).
    chain: list[Plan] = []
    for prompt in reversed(prompts):
        plan = plan_for(prompt, schemas)
        chain.append(plan)
        follow_up = _FOLLOW_UP.match(prompt) is not None or len(prompt.split()) <= 3
        if not (follow_up and len(plan.filters) == 1):
            break
    folded: Plan | None = None
    for current in reversed(chain):  # forward again, each follow-up keeping the criteria before it
        if folded is not None and current.schema == folded.schema:
            current = Plan(schema=current.schema, filters={**folded.filters, **current.filters})
        folded = current
    return folded or plan_for('', schemas)


def next_response(messages: list[ModelMessage], info: AgentInfo) -> list[ToolCallPart] | str:
    """The planner's next move: tool calls to make in parallel, or the final answer text."""
    prompts, parts = _turn_messages(messages)
    turn = len(prompts)
    # A call the tool asked the model to retry (`ModelRetry`) comes back as a return with outcome 'retried'
    # (pydantic-ai 2.68 retired `RetryPromptPart`): its content is the problem, not a result.
    returns = {p.tool_call_id: _content(p) for p in parts if p.outcome != 'retried'}
    retries = [p for p in parts if p.outcome == 'retried']
    plan = plan_for_conversation(prompts, _schemas_from(info))
    prefix = _prefix_of(parts) or f't{turn}'
    if plan.schema is None:
        return 'I have no directory to search for this account.'
    if not parts:
        return _search_calls(plan, prefix)
    main = returns.get(f'{prefix}-search')
    if main is None:
        problems = '; '.join(str(r.content) for r in retries) or 'the search did not run'
        return f'I could not search the {plan.schema.replace("_", " ")} directory: {problems}'
    detail_ids = [hit['id'] for hit in main.get('results', [])[:TOP_DETAILS]]
    if detail_ids and not any(key.startswith(f'{prefix}-entry-') for key in returns):
        return [
            ToolCallPart('get_directory_entry', {'entry_id': entry_id}, tool_call_id=f'{prefix}-entry-{entry_id}')
            for entry_id in detail_ids
        ]
    return compose_answer(plan, main, returns, prefix)


def _prefix_of(parts: list[ToolReturnPart]) -> str | None:
    """The prefix this turn's first calls were given. The turn number counts the prompts the model is sent, which
    changes within a turn when a bounded context leaves an older turn out between two requests."""
    found = re.match(r't\d+(?=-)', parts[0].tool_call_id) if parts else None
    return found.group() if found else None


def _search_calls(plan: Plan, prefix: str) -> list[ToolCallPart]:
    def call(suffix: str, filters: dict[str, str | bool], limit: int, query: str | None) -> ToolCallPart:
        args = {'query': query, 'schema_name': plan.schema, 'filters': filters, 'limit': limit}
        return ToolCallPart('search_directory', args, tool_call_id=f'{prefix}-{suffix}')

    calls = [call('search', plan.filters, 5, plan.query)]
    if len(plan.filters) >= 2:
        # One search per relaxed criterion, all in this one response: pydantic-ai runs them concurrently.
        for name in list(plan.filters)[:4]:
            calls.append(call(f'without-{name}', {k: v for k, v in plan.filters.items() if k != name}, 1, plan.query))
    else:  # the whole directory: no criterion and no keywords
        calls.append(call('whole-directory', {}, 1, None))
    return calls


def _content(part: ToolReturnPart) -> Any:
    try:
        return json.loads(part.model_response_str())
    except (TypeError, ValueError):
        return {}


def compose_answer(plan: Plan, main: dict[str, Any], returns: dict[str, Any], prefix: str) -> str:
    """Write the answer from the tool results only."""
    what = _describe(plan)
    total = main.get('total_matches', 0)
    lines = [f'I found {total} {what}.' if total else f'I found no {what}.']
    for index, hit in enumerate(main.get('results', [])[:5], start=1):
        detail = returns.get(f'{prefix}-entry-{hit["id"]}') or hit
        lines.append(f'{index}. {_entry_line(detail)}')
    context = []
    for key, value in returns.items():
        if key.startswith(f'{prefix}-without-') and isinstance(value, dict):
            dropped = key.removeprefix(f'{prefix}-without-')
            context.append(f'{value.get("total_matches", 0)} without the {dropped.replace("_", " ")} criterion')
        elif key == f'{prefix}-whole-directory' and isinstance(value, dict):
            context.append(f'{value.get("total_matches", 0)} entries in the whole directory')
    if context:
        lines.append('For comparison: ' + '; '.join(context) + '.')
    return '\n'.join(lines)


def _describe(plan: Plan) -> str:
    noun = 'providers' if plan.schema == vocab.MEDICAL_SCHEMA else 'suppliers'
    filters = dict(plan.filters)
    head = f'{filters.pop("specialty", None) or filters.pop("category", None) or ""} {noun}'.strip()
    parts = [f'{head} matching "{plan.query}"' if plan.query else head]
    if 'city' in filters:
        parts.append(f'in {filters.pop("city")}')
    for name, value in filters.items():
        if name == 'insurance':
            parts.append(f'who accept {value}')
        elif name == 'accepting_new_patients':
            parts.append('accepting new patients')
        else:
            parts.append(f'with {name.replace("_", " ")} {value}')
    return ' '.join(parts)


def _entry_line(entry: dict[str, Any]) -> str:
    attributes = entry.get('attributes') or {}
    facts = [f'{entry.get("category")}, {entry.get("city")}']
    for key in ('insurance', 'certifications', 'languages', 'delivery_days'):
        if attributes.get(key):
            facts.append(f'{key.replace("_", " ")}: {", ".join(map(str, attributes[key]))}')
    for key in ('rating', 'phone', 'min_order_usd'):
        if key in attributes:
            facts.append(f'{key.replace("_", " ")} {attributes[key]}')
    if attributes.get('accepting_new_patients') is not None:
        facts.append('accepting new patients' if attributes['accepting_new_patients'] else 'not accepting new patients')
    return f'{entry.get("name")} (#{entry.get("id")}): ' + '; '.join(facts)


# --- FunctionModel glue ------------------------------------------------------------------------------------------


async def _respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    # A coroutine, as `_stream` is: pydantic-ai runs a plain function in a worker thread of AnyIO's, which outlives
    # the loop when a `SystemExit` or `KeyboardInterrupt` leaves `asyncio.run` (only the root task's end stops those
    # threads): the interpreter then waited for it at exit for ever, the embedded server never released (QA).
    move = next_response(messages, info)
    return ModelResponse(parts=[TextPart(move)] if isinstance(move, str) else list(move))


def _stream(delay: float) -> Callable[[list[ModelMessage], AgentInfo], AsyncIterator[str | DeltaToolCalls]]:
    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
        move = next_response(messages, info)
        if isinstance(move, str):
            for chunk in re.findall(r'\s*\S+', move) or [move]:
                if delay:
                    await asyncio.sleep(delay)
                yield chunk
            return
        for index, call in enumerate(move):
            yield {index: DeltaToolCall(call.tool_name, call.args_as_json_str(), tool_call_id=call.tool_call_id)}

    return stream


class _DemoModel(FunctionModel):
    """`FunctionModel` whose streamed responses count their input tokens as its plain responses do.

    `FunctionModel`'s stream starts from an estimate of no messages (50 tokens whatever the history), so a streamed
    demo chat's ledger rows and token line stayed flat as the conversation grew while a plain one's grew.
    """

    @asynccontextmanager
    async def request_stream(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
        run_context: RunContext[Any] | None = None,
    ) -> AsyncIterator[StreamedResponse]:
        async with super().request_stream(messages, model_settings, model_request_parameters, run_context) as stream:
            # The plain path's own estimate of these messages (an empty response adds no tokens to its input).
            counted = await _INPUT_COUNTER.request(messages, model_settings, model_request_parameters)
            stream._usage += RequestUsage(input_tokens=counted.usage.input_tokens - stream.usage.input_tokens)
            yield stream


async def _nothing(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    return ModelResponse(parts=[])


_INPUT_COUNTER = FunctionModel(_nothing)
"""Answers nothing: `request` returns `FunctionModel`'s usage estimate of the messages it was given."""


def demo_model(*, stream_delay: float = 0.0) -> FunctionModel:
    """The `demo` model. `stream_delay` pauses between streamed words so streaming is visible in a terminal."""
    return _DemoModel(_respond, stream_function=_stream(stream_delay), model_name=DEMO_MODEL_NAME)
