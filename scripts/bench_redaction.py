"""Benchmark 5: `redact_text()` on 1 MB of the worst inputs we could construct, and the event-loop lag it causes.

For each input family: the time to redact 1 MB (best of --repeat runs; target < 1 s), the time for 2 MB divided by
the time for 1 MB (linear time gives ~2, quadratic ~4), the number of secrets found, the worst and p99 lag of
1 ms ticks on an asyncio loop while that 1 MB is redacted in a worker thread (`asyncio.to_thread`), which is how
callers keep redaction off the loop, and the time the ledger takes to turn a message holding that 1 MB into its
stored body (`Body.render()`: JSON, the check for secrets, the walk that redacts them). No database needed; the
event-loop lag of concurrent chat turns while such a message is stored is in bench_ledger_content.py.

Run:
    .venv/bin/python scripts/bench_redaction.py [--size 1000000] [--repeat 3] [--families prose,base64]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import string
import time
from collections.abc import Callable

from bench_common import (
    _host_info,
    parser,
    positive_int,
    run_benchmark,
    write_results,
)  # puts the repository root on sys.path

from agentrt.services.ledger._contents import Body
from agentrt.services.ledger.redaction import redact_text

PROSE = (
    'The quarterly review covered revenue, hiring and the migration to the new data centre. Dr. Priya Morgan '
    '(#481): Cardiology, Seattle. Revenue grew 12% to $4.2M on 2024-03-31; see https://example.com/q1?page=2 '
    'and commit 3f786850e387550fdab836ed7e6dc881de23001b. The key insight: tokens (input_tokens: 512) are cheap, '
    'passwords must be long, and the secret to good latency is caching. Contact ops@example.com for access.\n'
)
MULTILINGUAL = (
    'Die Schlüsselübergabe ist am Montag. 会议在星期一举行，请带上密码规则文档。 Пароль должен быть длинным. '
    'كلمة المرور يجب أن تكون طويلة. La clé est sous le paillasson; le mot de passe: voir le coffre. 🙂\n'
)
SECRETS = (
    'sk-proj-Ab3dEfGhIjKlMnOpQrStUvWx12 ghp_0123456789abcdefghijABCDEFGHIJklmnop '
    'AKIAIOSFODNN7EXAMPLE password=hunter22 eyJhbGciOiJub25lIn0.eyJzdWIiOiIxMjM0In0. '
    'postgresql://u:p@ss/w@db/x Bearer abc123def456ghi xoxb-1234567890-abcdefghij '
    '"api_key": "zzz-secret-123" glpat-abcdefghij0123456789 npm_abcdefghijklmnopqrstuvwxyz0123456789\n'
)


def _repeat(unit: str, size: int) -> str:
    return (unit * (size // len(unit) + 1))[:size]


def _random(alphabet: str, size: int, seed: int) -> str:
    rng = random.Random(seed)
    return ''.join(rng.choices(alphabet, k=size))


B64 = string.ascii_letters + string.digits + '+/'
FAMILIES: dict[str, Callable[[int], str]] = {
    'prose (English)': lambda n: _repeat(PROSE, n),
    'prose (multilingual, non-ASCII)': lambda n: _repeat(MULTILINGUAL, n),
    'no triggers at all (x...)': lambda n: 'x' * n,
    'dashes (-----)': lambda n: '-' * n,
    'equals signs (=====)': lambda n: '=' * n,
    'colons (:::::)': lambda n: ':' * n,
    'backslashes (\\\\\\)': lambda n: '\\' * n,
    'JSON newline escapes (\\n\\n)': lambda n: _repeat('\\n', n),
    'a= repeated': lambda n: _repeat('a=', n),
    'password= repeated': lambda n: _repeat('password=', n),
    'password: repeated': lambda n: _repeat('password: ', n),
    '"password": " repeated': lambda n: _repeat('"password": "', n),
    'token token ... (name, space)': lambda n: _repeat('token ', n),
    'password=a))))... (one value, closers)': lambda n: 'password=a' + ')' * (n - 10),
    'password=a).).).. (closers, dots)': lambda n: 'password=a' + _repeat(').', n - 10),
    '"password": "x1", repeated (JSON)': lambda n: _repeat('"password": "x1y2", ', n),
    'password: Ab1 repeated (accepted)': lambda n: _repeat('password: Ab1\n', n),
    'KEY=value env lines': lambda n: _repeat('API_KEY_X=Zq8fK2mP9xW4vL7nR3tY6bH1cD5gJ0sA\n', n),
    ':// repeated': lambda n: _repeat('://', n),
    'a://a: repeated (URL, no @)': lambda n: _repeat('a://a:', n),
    'a://a:b@ repeated': lambda n: _repeat('a://a:b@', n),
    'one URL, 1 MB password': lambda n: 'https://u:' + 'p' * (n - 20) + '@host',
    '-----BEGIN repeated': lambda n: _repeat('-----BEGIN ', n),
    'PEM armour repeated': lambda n: _repeat('-----BEGIN RSA PRIVATE KEY-----\n', n),
    'PEM, 1 MB body, no END': lambda n: '-----BEGIN PRIVATE KEY-----\n' + _repeat('MIIEvQIBADANBgkqhkiG9w0B\n', n),
    'base64 soup': lambda n: _random(B64, n, 1),
    'base64 soup with newlines': lambda n: _random(B64 + '\n', n, 2),
    'hex soup': lambda n: _random('0123456789abcdef', n, 3),
    'digits and colons (Telegram)': lambda n: _repeat('12345678:', n),
    'eyJ repeated': lambda n: _repeat('eyJ', n),
    'eyJa.eyJb. repeated (JWT parts)': lambda n: _repeat('eyJabcdefgh.eyJ.', n),
    'sk- repeated': lambda n: _repeat('sk-', n),
    'sk-1 run (one 1 MB key)': lambda n: 'sk-' + _repeat('a1', n - 3),
    'Bearer repeated': lambda n: _repeat('Bearer ', n),
    'Basic + base64 repeated': lambda n: _repeat('Basic dXNlcjpwYXNz ', n),
    'aws + 40 chars repeated': lambda n: _repeat('aws wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY ', n),
    'all triggers soup': lambda n: _repeat(
        'sk- ghp_ glpat- xox hf_ AKIA aiza ya29. eyJ -----BEGIN PRIVATE KEY----- :// bearer basic password '
        'secret token api_key= aws 12345678: sg. _live_ npm_ -us1 key- sq0 .atlasv1. ',
        n,
    ),
    'dense real secrets': lambda n: _repeat(SECRETS, n),
    'NUL and lone surrogates': lambda n: _repeat('\x00\ud800 password=hunter22 \udfff', n),
}


def _best(text: str, repeat: int) -> tuple[float, int]:
    best, count = float('inf'), 0
    for _ in range(repeat):
        started = time.perf_counter()
        _, count = redact_text(text)
        best = min(best, time.perf_counter() - started)
    return best, count


def _stored(text: str, repeat: int) -> float:
    best = float('inf')
    for _ in range(repeat):
        body = Body({'parts': [{'part_kind': 'user-prompt', 'content': text}], 'kind': 'request'})
        started = time.perf_counter()
        body.render()
        best = min(best, time.perf_counter() - started)
    return best


async def _loop_lag(text: str) -> tuple[float, float]:
    """Worst and p99 lag of 1 ms ticks on this loop while `text` is redacted in a worker thread."""
    lags: list[float] = []
    work = asyncio.ensure_future(asyncio.to_thread(redact_text, text))
    while not work.done():
        started = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append(time.perf_counter() - started - 0.001)
    await work
    lags.sort()
    return lags[-1], lags[int(len(lags) * 0.99) - 1] if len(lags) > 1 else lags[-1]


def main() -> None:
    args = _arguments()
    size, repeat = (25_000, 1) if args.quick else (args.size, args.repeat)
    wanted = [f.strip() for f in args.families.split(',') if f.strip()]
    machine = _host_info()
    print(f'Python {machine["python"]}, {machine["cpus"]} CPUs, load {machine["load_average_at_start"]}')
    print(f'{size:,} characters per input, best of {repeat}')
    print(f'{"input family":42} {"1x (ms)":>9} {"2x/1x":>6} {"found":>8} {"lag max":>8} {"lag p99":>8} {"stored":>8}')
    rows = []
    for name, make in FAMILIES.items():
        if wanted and not any(w in name for w in wanted):
            continue
        one, two = make(size), make(2 * size)
        t1, count = _best(one, repeat)
        t2, _ = _best(two, repeat)
        lag_max, lag_p99 = asyncio.run(_loop_lag(one))
        stored = _stored(one, repeat)
        ratio = t2 / t1 if t1 > 0 else float('nan')
        rows.append({
            'family': name, 'ms_1x': round(t1 * 1000, 1), 'ratio_2x': round(ratio, 2), 'found': count,
            'lag_max_ms': round(lag_max * 1000, 1), 'lag_p99_ms': round(lag_p99 * 1000, 1),
            'stored_ms': round(stored * 1000, 1),
        })  # fmt: skip
        print(f'{name:42} {t1 * 1000:9.1f} {ratio:6.2f} {count:8,} {lag_max * 1000:8.1f} {lag_p99 * 1000:8.1f} '
              f'{stored * 1000:8.1f}')  # fmt: skip
    worst = max(rows, key=lambda row: row['ms_1x'])
    summary = {
        'worst_family': worst['family'],
        'worst_ms_1x': worst['ms_1x'],
        'max_ratio_2x': max(row['ratio_2x'] for row in rows),
        'max_lag_ms': max(row['lag_max_ms'] for row in rows),
        'prose_ms_1x': next((row['ms_1x'] for row in rows if row['family'] == 'prose (English)'), None),
        'worst_stored_ms': max(row['stored_ms'] for row in rows),
    }
    print(f'worst: {worst["family"]} {worst["ms_1x"]:.1f} ms (target < 1000 ms per MB); '
          f'largest 2x/1x {summary["max_ratio_2x"]:.2f}; worst loop lag {summary["max_lag_ms"]:.1f} ms')  # fmt: skip
    config = {'size': size, 'repeat': repeat, 'families': wanted or 'all'}
    write_results(args.out, 'bench_redaction', config, machine, rows, summary)


def _arguments() -> argparse.Namespace:
    result = parser(__doc__.splitlines()[0], 'bench_redaction')
    result.add_argument('--size', type=positive_int, default=1_000_000, help='characters per input (default 1 MB)')
    result.add_argument('--repeat', type=positive_int, default=3, help='runs per input; the best is reported')
    result.add_argument('--families', default='', help='comma-separated substrings of family names to run')
    return result.parse_args()


if __name__ == '__main__':
    run_benchmark(main, interrupted='interrupted')
