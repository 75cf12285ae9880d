"""Planted secrets (kinds x positions) and ordinary text for the redaction tests.

Every secret is generated from a fixed seed in the provider's published shape; none is real. Each kind says which
rule should find it, the text around the secret (`template`, `{s}` is the secret) and the positions that make sense
for it (a multi-line PEM key is not put inside a URL).
"""

from __future__ import annotations

import base64
import json
import random
import string
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

ALNUM = string.ascii_letters + string.digits
UPPER_DIGITS = string.ascii_uppercase + string.digits
LOWER_DIGITS = string.ascii_lowercase + string.digits
HEX = '0123456789abcdef'
B64 = ALNUM + '+/'
URLSAFE = ALNUM + '_-'


def tok(name: str, alphabet: str, length: int, part: int = 0) -> str:
    """`length` random characters of `alphabet`, the same on every run, with a digit and both cases when the
    alphabet has them (real keys do; it keeps checks like `has_digit` honest about what they see)."""
    rng = random.Random(zlib.crc32(f'{name}/{part}'.encode()))
    while True:
        value = ''.join(rng.choices(alphabet, k=length))
        wanted = [set(string.digits), set(string.ascii_lowercase), set(string.ascii_uppercase)]
        if all(not (set(alphabet) & w) or set(value) & w for w in wanted) or length < 8:
            return value


def b64url(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj, separators=(',', ':')).encode()).decode().rstrip('=')


def pem(kind: str, name: str, headers: str = '') -> str:
    body = '\n'.join(tok(name, B64, 64, part=i) for i in range(5)) + '\n' + tok(name, B64, 20, part=9) + '=='
    return f'-----BEGIN {kind}-----\n{headers}{body}\n-----END {kind}-----'


ALL_POSITIONS = ('inline', 'line_start', 'after_tab', 'tool_result_dict', 'tool_result_json_text', 'json_in_string',
                 'url', 'error_body')  # fmt: skip
NO_URL = tuple(p for p in ALL_POSITIONS if p != 'url')


@dataclass(frozen=True)
class Kind:
    """One kind of secret: `template` with `{s}` replaced by `secret` is what gets planted."""

    name: str
    rule: str
    secret: str
    template: str = '{s}'
    positions: tuple[str, ...] = ALL_POSITIONS
    fragments: tuple[str, ...] = field(default=())

    @property
    def text(self) -> str:
        return self.template.format(s=self.secret)

    def distinctive(self) -> tuple[str, ...]:
        """Parts of the secret that must not survive: given, or the middle of the secret (12+ characters)."""
        if self.fragments:
            return self.fragments
        s = self.secret
        return (s[len(s) // 3 : len(s) // 3 + max(12, len(s) // 3)],)


def _jwt(name: str, signed: bool) -> str:
    header = b64url({'alg': 'HS256' if signed else 'none', 'typ': 'JWT'})
    payload = b64url({'sub': f'user-{tok(name, ALNUM, 12)}', 'role': 'admin', 'iat': 1700000000})
    signature = tok(name, URLSAFE, 43, part=1) if signed else ''
    return f'{header}.{payload}.{signature}'


_PEM_RSA = pem('RSA PRIVATE KEY', 'pem-rsa')
_PEM_ENC = pem(
    'RSA PRIVATE KEY', 'pem-enc', 'Proc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,3F17F5316E2BAC89A3C0B1D2E3F40516\n\n'
)
_PEM_SSH = pem('OPENSSH PRIVATE KEY', 'pem-openssh')
_PEM_PKCS8 = pem('ENCRYPTED PRIVATE KEY', 'pem-pkcs8')
_PEM_PGP = pem('PGP PRIVATE KEY BLOCK', 'pem-pgp', 'Version: GnuPG v2\n\n')
_SSH2 = (
    '---- BEGIN SSH2 ENCRYPTED PRIVATE KEY ----\nComment: "rsa-key-20240101"\n'
    + '\n'.join(tok('ssh2', B64, 64, part=i) for i in range(4))
    + '\n---- END SSH2 ENCRYPTED PRIVATE KEY ----'
)
_PUTTY = (
    'PuTTY-User-Key-File-2: ssh-rsa\nEncryption: none\nComment: imported-openssh-key\nPublic-Lines: 1\n'
    'AAAAB3NzaC1yc2EAAAADAQABAAABAQ\nPrivate-Lines: 3\n'
    + '\n'.join(tok('putty', B64, 64, part=i) for i in range(3))
    + '\nPrivate-MAC: 0123456789abcdef0123456789abcdef01234567'
)


def _body_fragments(key: str) -> tuple[str, ...]:
    lines = [line for line in key.splitlines() if len(line) == 64]
    return tuple(line[20:36] for line in lines)


KINDS: tuple[Kind, ...] = (
    Kind('openai-project-key', 'openai-style-key', 'sk-proj-' + tok('openai', URLSAFE, 48)),
    Kind('anthropic-key', 'openai-style-key', 'sk-ant-api03-' + tok('anthropic', URLSAFE, 93) + 'AA'),
    Kind('github-classic-token', 'github-token', 'ghp_' + tok('ghp', ALNUM, 36)),
    Kind('github-fine-grained-token', 'github-fine-grained-token',
         'github_pat_11' + tok('ghpat', UPPER_DIGITS, 20) + '_' + tok('ghpat', ALNUM, 59, part=1)),
    Kind('gitlab-token', 'gitlab-token', 'glpat-' + tok('glpat', URLSAFE, 20)),
    Kind('agentrt-api-key', 'agentrt-api-key', 'art_' + tok('art', HEX, 12) + '_' + tok('art', URLSAFE, 43, part=1)),
    Kind('slack-bot-token', 'slack-token',
         f'xoxb-{tok("slack", string.digits, 12)}-{tok("slack", string.digits, 13, 1)}-{tok("slack", ALNUM, 24, 2)}'),
    Kind('slack-webhook', 'slack-webhook',
         f'T{tok("hook", UPPER_DIGITS, 10)}/B{tok("hook", UPPER_DIGITS, 10, 1)}/{tok("hook", ALNUM, 24, 2)}',
         template='https://hooks.slack.com/services/{s}'),
    Kind('stripe-live-key', 'stripe-key', 'sk_live_' + tok('stripe', ALNUM, 99)),
    Kind('stripe-webhook-secret', 'stripe-key', 'whsec_' + tok('whsec', ALNUM, 32)),
    Kind('aws-access-key-id', 'aws-access-key-id', 'AKIA' + tok('akia', UPPER_DIGITS, 16)),
    Kind('aws-secret-key-assignment', 'secret-assignment', tok('aws-assign', B64, 40),
         template='aws_secret_access_key = {s}'),
    Kind('aws-secret-key-in-prose', 'aws-secret-access-key', tok('aws-prose', B64, 40),
         template='AWS credentials for the bucket: AKIAZ7Q3W9E5R1T8Y4U2 / {s} (rotate soon)'),
    # The key alone on the line after its label: in JSON text the newline is `\n`, whose `n` read as part of the key.
    Kind('aws-secret-key-next-line', 'aws-secret-access-key', tok('aws-nextline', B64, 40),
         template='AWS secret key:\n{s}\n', positions=NO_URL),
    Kind('aws-secret-key-after-crlf', 'aws-secret-access-key', tok('aws-crlf', B64, 40),
         template='AWS secret key:\r\n{s}\r\n', positions=NO_URL),
    Kind('aws-secret-key-after-a-blank-line', 'aws-secret-access-key', tok('aws-blank', B64, 40),
         template='AWS secret key:\n\n    {s}\n', positions=NO_URL),
    Kind('aws-sts-json', 'secret-assignment', tok('aws-sts', B64, 40), template='"SecretAccessKey": "{s}"',
         positions=NO_URL),
    Kind('google-api-key', 'google-api-key', 'AIza' + tok('aiza', URLSAFE, 35)),
    Kind('google-oauth-access-token', 'google-oauth-access-token', 'ya29.a0' + tok('ya29', URLSAFE, 120)),
    Kind('google-oauth-refresh-token', 'google-oauth-refresh-token', '1//0' + tok('g-refresh', URLSAFE, 100)),
    Kind('google-oauth-client-secret', 'google-oauth-client-secret', 'GOCSPX-' + tok('gocspx', URLSAFE, 28)),
    Kind('huggingface-token', 'huggingface-token', 'hf_' + tok('hf', ALNUM, 34)),
    Kind('npm-token', 'npm-token', 'npm_' + tok('npm', ALNUM, 36)),
    Kind('pypi-token', 'pypi-token', 'pypi-AgEIcHlwaS5vcmc' + tok('pypi', URLSAFE, 100)),
    Kind('sendgrid-key', 'sendgrid-api-key', f'SG.{tok("sg", URLSAFE, 22)}.{tok("sg", URLSAFE, 43, 1)}'),
    Kind('twilio-api-key-sid', 'twilio-key', 'SK' + tok('twilio', HEX, 32)),
    Kind('twilio-auth-token', 'secret-assignment', tok('twilio-auth', HEX, 32), template='TWILIO_AUTH_TOKEN={s}'),
    Kind('mailgun-key', 'mailgun-api-key', 'key-' + tok('mailgun', LOWER_DIGITS, 32)),
    Kind('mailchimp-key', 'mailchimp-api-key', tok('mailchimp', HEX, 32) + '-us14'),
    Kind('datadog-api-key', 'secret-assignment', tok('datadog', HEX, 32), template='DD_API_KEY={s}'),
    Kind('azure-storage-key', 'azure-storage-key', tok('azure', B64, 86) + '==',
         template='DefaultEndpointsProtocol=https;AccountName=acme;AccountKey={s};EndpointSuffix=core.windows.net'),
    Kind('azure-ad-client-secret', 'azure-ad-client-secret',
         tok('entra', ALNUM, 3) + '8Q~' + tok('entra', ALNUM + '_~', 34, 1)),
    Kind('jwt-signed', 'jwt', _jwt('jwt', signed=True)),
    Kind('jwt-unsigned', 'jwt', _jwt('jwt-none', signed=False)),
    Kind('pem-rsa-key', 'private-key', _PEM_RSA, positions=NO_URL, fragments=_body_fragments(_PEM_RSA)),
    Kind('pem-encrypted-key', 'private-key', _PEM_ENC, positions=NO_URL,
         fragments=(*_body_fragments(_PEM_ENC), '3F17F5316E2BAC89')),
    Kind('openssh-key', 'private-key', _PEM_SSH, positions=NO_URL, fragments=_body_fragments(_PEM_SSH)),
    Kind('pkcs8-encrypted-key', 'private-key', _PEM_PKCS8, positions=NO_URL, fragments=_body_fragments(_PEM_PKCS8)),
    Kind('pgp-private-key', 'private-key', _PEM_PGP, positions=NO_URL, fragments=_body_fragments(_PEM_PGP)),
    Kind('ssh2-private-key', 'ssh2-private-key', _SSH2, positions=NO_URL, fragments=_body_fragments(_SSH2)),
    Kind('putty-private-key', 'putty-private-key', _PUTTY, positions=NO_URL, fragments=_body_fragments(_PUTTY)),
    Kind('url-password-with-slash-and-at', 'url-password', 'p@ss/w0rd:' + tok('urlpw', ALNUM, 10),
         template='postgresql://app:{s}@db.example.com:5432/prod', fragments=('ss/w0rd',)),
    Kind('url-password-redis', 'url-password', tok('redis', ALNUM, 16), template='redis://:{s}@cache:6379/0'),
    Kind('git-credential-url', 'url-password', 'ghs_' + tok('ghs', ALNUM, 36),
         template='https://x-access-token:{s}@github.com/acme/app.git'),
    Kind('password-assignment', 'secret-assignment', 'Tr0ub4dor&3' + tok('pwassign', ALNUM, 6),
         template='password={s}', fragments=('Tr0ub4dor',)),
    Kind('password-in-json', 'secret-assignment', 'N0t so s3cret ' + tok('pwjson', ALNUM, 6),
         template='{{"db_password": "{s}"}}', positions=NO_URL),
    Kind('password-yaml', 'secret-assignment', 'letmein' + tok('pwyaml', string.ascii_lowercase, 8),
         template='database:\n  host: db\n  password: {s}\n  port: 5432', positions=NO_URL),
    Kind('password-in-prose', 'secret-assignment', 'Blue-Falcon-' + tok('pwprose', string.digits, 4),
         template='the wifi password is {s} by the way', positions=NO_URL),
    Kind('client-secret', 'secret-assignment', tok('clientsecret', URLSAFE, 32),
         template='client_secret: "{s}"', positions=NO_URL),
    Kind('basic-auth-header', 'basic-auth',
         base64.b64encode(f'admin:{tok("basic", ALNUM, 14)}'.encode()).decode(),
         template='Authorization: Basic {s}', positions=NO_URL),
    Kind('bearer-header', 'bearer-token', tok('bearer', ALNUM, 40), template='Authorization: Bearer {s}',
         positions=NO_URL),
    Kind('x-api-key-header', 'secret-assignment', tok('xapikey', ALNUM, 32), template='X-Api-Key: {s}',
         positions=NO_URL),
    Kind('cookie-header', 'secret-assignment', tok('cookie', ALNUM, 32),
         template='Cookie: sessionid={s}; theme=dark', positions=NO_URL),
    Kind('curl-user', 'curl-user', tok('curl', ALNUM, 14) + '!9',
         template='curl -u admin:{s} https://api.example.com/v1/items', positions=NO_URL),
    Kind('cli-flag', 'cli-secret-flag', tok('cliflag', ALNUM, 24), template='deploy --api-key {s} --verbose',
         positions=NO_URL),
    # The flag first on its line (a pasted multi-line shell command): in JSON text the newline before it is `\n`,
    # which the rules did not take as a line start, so these were stored in clear (QA).
    Kind('cli-flag-first', 'cli-secret-flag', tok('cliflagfirst', ALNUM, 24), template='--password {s} \\',
         positions=NO_URL),
    # A quoted value: in JSON text its quote is `\"`, which the rules did not read as one (QA).
    Kind('cli-flag-quoted', 'cli-secret-flag', tok('cliflagquoted', ALNUM, 24),
         template='deploy --password "{s}" --verbose', positions=NO_URL),
    Kind('curl-user-quoted', 'curl-user', tok('curlquoted', ALNUM, 14) + '!5',
         template='curl -u "admin:{s}" https://x.io', positions=NO_URL),
    Kind('curl-user-first', 'curl-user', tok('curlfirst', ALNUM, 14) + '!7', template='-u admin:{s} \\',
         positions=NO_URL),
    Kind('signature-first', 'url-signature', tok('sigfirst', ALNUM, 40), template='sig={s}&se=2030-01-01',
         positions=NO_URL),
    # Markdown an answer is written in, and SQL a PostgreSQL tool runs (QA).
    Kind('password-markdown-bold', 'secret-assignment', tok('mdbold', ALNUM, 14), template='- **Password:** {s}',
         positions=NO_URL),
    Kind('markdown-table-password', 'markdown-table-secret', tok('mdtable', ALNUM, 14),
         template='| Setting | Value |\n|---|---|\n| password | {s} |\n| host | db |',
         positions=('line_start', 'tool_result_dict', 'tool_result_json_text', 'json_in_string')),
    Kind('sql-password', 'sql-password', tok('sqlpw', ALNUM, 14),
         template="ALTER USER app WITH PASSWORD '{s}';", positions=NO_URL),
    Kind('xml-password', 'xml-secret', tok('xml', ALNUM, 18), template='<password>{s}</password>', positions=NO_URL),
    Kind('azure-sas-signature', 'url-signature', tok('sas', ALNUM, 40) + '%3D',
         template='https://acme.blob.core.windows.net/c/b.txt?sv=2022-11-02&sr=b&sp=r&sig={s}'),
    Kind('env-high-entropy', 'env-high-entropy', tok('env', ALNUM, 32), template='MY_SERVICE_BLOB={s}',
         positions=('line_start', 'tool_result_json_text', 'json_in_string')),
    Kind('discord-bot-token', 'discord-bot-token',
         f'M{tok("discord", URLSAFE, 23)}.{tok("discord", URLSAFE, 6, 1)}.{tok("discord", URLSAFE, 38, 2)}'),
    Kind('discord-webhook', 'discord-webhook', tok('dwebhook', URLSAFE, 68),
         template='https://discord.com/api/webhooks/123456789012345678/{s}'),
    Kind('telegram-bot-token', 'telegram-bot-token', tok('tg', string.digits, 9) + ':AA' + tok('tg', URLSAFE, 33, 1)),
    Kind('shopify-token', 'shopify-token', 'shpat_' + tok('shopify', HEX, 32)),
    Kind('digitalocean-token', 'digitalocean-token', 'dop_v1_' + tok('do', HEX, 64)),
    Kind('vault-token', 'hashicorp-vault-token', 'hvs.' + tok('vault', URLSAFE, 90)),
    Kind('terraform-token', 'terraform-cloud-token', f'{tok("tfc", ALNUM, 14)}.atlasv1.{tok("tfc", URLSAFE, 67, 1)}'),
    Kind('databricks-token', 'databricks-token', 'dapi' + tok('databricks', HEX, 32)),
    Kind('groq-key', 'groq-api-key', 'gsk_' + tok('groq', ALNUM, 52)),
    Kind('replicate-token', 'replicate-token', 'r8_' + tok('replicate', ALNUM, 37)),
    Kind('perplexity-key', 'perplexity-api-key', 'pplx-' + tok('pplx', ALNUM, 48)),
    Kind('xai-key', 'xai-api-key', 'xai-' + tok('xai', ALNUM, 80)),
    Kind('logfire-token', 'logfire-token', 'pylf_v1_us_' + tok('logfire', ALNUM, 40)),
    Kind('docker-hub-token', 'docker-hub-token', 'dckr_pat_' + tok('docker', URLSAFE, 27)),
    Kind('atlassian-token', 'atlassian-api-token', 'ATATT3' + tok('atlassian', URLSAFE, 180)),
    Kind('sentry-token', 'sentry-token', 'sntrys_' + tok('sentry', ALNUM, 80)),
    Kind('notion-token', 'notion-token', 'ntn_' + tok('notion', string.digits, 11) + tok('notion', ALNUM, 35, 1)),
    Kind('linear-key', 'linear-api-key', 'lin_api_' + tok('linear', ALNUM, 40)),
    Kind('postman-key', 'postman-api-key', f'PMAK-{tok("postman", HEX, 24)}-{tok("postman", HEX, 34, 1)}'),
    Kind('square-secret', 'square-token', 'sq0csp-' + tok('square', URLSAFE, 43)),
    Kind('pulumi-token', 'pulumi-token', 'pul-' + tok('pulumi', HEX, 40)),
    Kind('doppler-token', 'doppler-token', 'dp.pt.' + tok('doppler', ALNUM, 43)),
    Kind('figma-token', 'figma-token', 'figd_' + tok('figma', URLSAFE, 40)),
    Kind('airtable-token', 'airtable-token', f'pat{tok("airtable", ALNUM, 14)}.{tok("airtable", HEX, 64, 1)}'),
    Kind('grafana-token', 'grafana-token', f'glsa_{tok("grafana", ALNUM, 32)}_{tok("grafana", HEX, 8, 1)}'),
    Kind('new-relic-key', 'new-relic-key', 'NRAK-' + tok('newrelic', UPPER_DIGITS, 27)),
    Kind('supabase-token', 'supabase-key', 'sbp_' + tok('supabase', HEX, 40)),
    Kind('heroku-key', 'heroku-api-key', 'HRKU-' + tok('heroku', URLSAFE, 60)),
    Kind('alibaba-key-id', 'alibaba-access-key-id', 'LTAI' + tok('alibaba', ALNUM, 20)),
    Kind('artifactory-key', 'artifactory-token', 'AKCp8' + tok('artifactory', ALNUM, 68)),
    Kind('facebook-token', 'facebook-access-token', 'EAA' + tok('facebook', ALNUM, 150)),
    Kind('firebase-server-key', 'firebase-cloud-messaging-key',
         f'AAAA{tok("fcm", URLSAFE, 7)}:{tok("fcm", URLSAFE, 140, 1)}'),
    Kind('age-secret-key', 'age-secret-key', 'AGE-SECRET-KEY-1' + tok('age', UPPER_DIGITS, 58)),
)  # fmt: skip


# Positions: each turns the planted text into what a caller redacts, and the redacted result back into text to
# search for the secret (for dicts, their JSON). `redacts_value` marks positions that go through `redact_value()`.
@dataclass(frozen=True)
class Position:
    name: str
    build: Callable[[str], object]
    redacts_value: bool = False
    is_json_text: bool = False


def _tool_result(planted: str) -> dict[str, object]:
    return {'status': 'ok', 'rows': [{'id': 7, 'note': f'config follows:\n{planted}\n(end)', 'score': 0.5}]}


POSITIONS: dict[str, Position] = {
    'inline': Position('inline', lambda t: f'Use {t} for the staging deploy, thanks'),
    'line_start': Position('line_start', lambda t: f'Sure, here it is:\n{t}\nLet me know if it works.'),
    'after_tab': Position('after_tab', lambda t: f'name\tvalue\nprod\t{t}\tactive'),
    'tool_result_dict': Position('tool_result_dict', _tool_result, redacts_value=True),
    'tool_result_json_text': Position(
        'tool_result_json_text', lambda t: json.dumps(_tool_result(t)), is_json_text=True
    ),
    # JSON text inside a string a tool returned, inside a message dict.
    'json_in_string': Position(
        'json_in_string',
        lambda t: {'part_kind': 'tool-return', 'content': json.dumps(_tool_result(t))},
        redacts_value=True,
    ),
    'url': Position('url', lambda t: f'GET https://api.example.com/v1/callback?state=xyz&code={t}&mode=1 failed'),
    'error_body': Position(
        'error_body',
        lambda t: (
            'Error code: 401 - {"error": {"message": "Incorrect API key provided: '
            + t
            + '. You can find your API key at https://platform.example.com.", "type": "invalid_request_error"}}'
        ),
    ),
}


# Ordinary text that must come back byte-identical.
FALSE_POSITIVES: tuple[str, ...] = (
    # English prose with the words secret rules look for
    'The key insight: secrets stay secret. Token counting works (tokens: 500, input_tokens: 12, max_tokens=1024).',
    'Passwords must be at least 12 characters long. The password reset link expires in 24 hours.',
    'The bearer of this letter is a basic member; bearer bonds and basic income are old ideas.',
    'Token: the smallest unit of text a model reads. The secret to low latency is caching.',
    'Access tokens expire after 3600 seconds; refresh tokens last 30 days. Your password is too short.',
    'The password is stored hashed; the api key is shown once; my token is expired.',
    'Press the key: Enter. Then type your password when prompted.',
    'See sk-learn docs, the high ghost, risk-adjusted-return-on-capital and task-runner-v2.',
    'Dr. Priya Morgan (#481): Cardiology, Seattle\nDr. Jonas Weber (#482): Oncology, Berlin\n',
    'Revenue grew 12% to $4.2M (€3.9M) on 2024-03-31; the Q2 price is $1,299.00 per seat, 20% off.',
    'Contact alice.smith+billing@example.com or ops@example.co.uk, phone +1 (206) 555-0100.',
    'Meeting at 2024-03-31T12:00:00Z, then 2024-04-01 09:30 CEST. Version 1.2.3-rc.1 shipped.',
    # other languages
    'Das Passwort muss mindestens zwölf Zeichen lang sein. Der Schlüssel liegt unter der Fußmatte.',
    'Le mot de passe doit être long ; la clé secrète est dans le coffre. Jeton : unité de texte.',
    'La contraseña debe ser larga y el token caduca en una hora.',
    '密码必须至少包含十二个字符。令牌在一小时后过期。会议在星期一举行。',
    'パスワードは十二文字以上にしてください。トークンは一時間で失効します。',
    'Пароль должен быть длинным. Токен истекает через час. Секрет успеха прост.',
    'كلمة المرور يجب أن تكون طويلة. الرمز ينتهي بعد ساعة.',
    # code
    (
        'def login(username: str, password: str) -> bool:\n'
        '    token = create_token(username)\n'
        '    hashed = hash_password(password)\n'
        "    api_key = os.environ['OPENAI_API_KEY']\n"
        "    headers = {'Authorization': f'Bearer {token}'}\n"
        '    for token in tokens:\n'
        '        count += 1\n'
        '    if password is None:\n'
        "        raise ValueError('password required')\n"
        '    secret = settings.SECRET_KEY\n'
        '    password = getpass()\n'
        '    token = tokens[0]\n'
        '    return verify(password, hashed)\n'
    ),
    (
        'class Settings(BaseSettings):\n'
        '    api_key: SecretStr\n'
        '    password: str | None = None\n'
        '    token_limit: int = 4096\n'
    ),
    (
        'SELECT id, email FROM users WHERE password_hash = crypt($1, password_hash) AND token_expires_at > now();\n'
        'CREATE TABLE api_keys (id uuid primary key, key_hash text not null, secret_hint varchar(8));\n'
        'UPDATE users SET password = $1 WHERE id = $2;\n'
    ),
    (
        'const token = await getToken();\n'
        'const apiKey = process.env.API_KEY;\n'
        'fetch(url, { headers: { Authorization: `Bearer ${token}` } });\n'
        'const password = req.body.password;\n'
        "const secret = '';\n"
    ),
    'export GITHUB_TOKEN=$(gh auth token)\npassword: ${DB_PASSWORD}\ntoken: {{ secrets.TOKEN }}\n',
    'PATH=/usr/local/bin:/usr/bin\nPWD=/home/me/project\nLANG=en_US.UTF-8\nIMAGE_TAG=v1.2.3-rc1\n'
    'GIT_COMMIT=3f786850e387550fdab836ed7e6dc881de23001b\nBUILD_ID=20240331.1\n',
    # URLs without credentials
    'https://example.com/path?q=1&page=2 https://user@example.com/ http://localhost:8000/@vite/client',
    'https://github.com/org/repo/blob/main/README.md#L10 postgresql://db.internal:5432/agents',
    'mailto:alice@example.com git@github.com:org/repo.git ssh://git@github.com:22/org/repo.git',
    'https://example.com/search?token_type=bearer&max_tokens=100&key=value',
    # identifiers and hashes
    'request 123e4567-e89b-12d3-a456-426614174000 commit 3f786850e387550fdab836ed7e6dc881de23001b',
    'sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08, md5 d41d8cd98f00b204e9800998ecf8427e',
    'image sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824 pulled',
    'Here is the image: data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAC'
    'hwGA60e6kgAAAABJRU5ErkJggg== as requested.',
    '"integrity": "sha512-z4PhNX7vuL3xVChQ1m2AB9Yg5AULVxXcg/SpIdNs6c5H0NE8XYXysP+DGNKHfuwvY7kxvUdBeoGlODJ6+SfaPg=="',
    '2024-03-31T12:00:00Z INFO request_id=7f9c2a1e status=200 duration_ms=12 path=/api/v1/chat',
    '| name | value |\n|------|-------|\n| tokens | 512 |\n| key | primary |\n-----\n',
    'Use the -u flag for unbuffered output: python -u main.py; git push -u origin main',
    # shapes found by scanning library sources and docs: code, not secrets
    (
        'class Client:\n'
        '    client_secret: SessionClientSecret\n'
        '    token: EventLoopToken | None = None\n'
        "    styles = {'token': TOKEN, 'api_key': API_KEY, Token: '#ffffff'}\n"
        '    stream = self.root.open(self.at, mode, pwd=pwd)\n'
        '    out = Block(signature=block.signature, sig=part.signature_delta)\n'
        '    if token == "lambda":\n'
        '        headers["authorization"] = "Basic " + b64encode(raw).decode()\n'
        '    upgrade_token="%s_upgrades" % name\n'
        '    REVISION_SCRIPT_TOKEN = "REVISION_SCRIPT_FILENAME"\n'
        '    ACCESS_TOKEN_OPTION = 1256\n'
        '    UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"\n'
        '    KUBERNETES_POD_UID = ResourceAttributes.K8S_POD_UID\n'
        '    emoji = {"cookie": "🍪", "secret": "㊙"}\n'
    ),
    '[set up the credentials]: https://github.com/nodejs/node-core-utils#setting-up-github-credentials',
    'env: {PWD: \'/Users/maciej\', "OLDPWD": "/home/node/project"}',
    '2.7.2. Basic Options; basic usage; Basic Authentication is described in RFC 7617.',
    'The handle is an in-process correlation token: `last_message` holds a live message.',
)
