"""Desktop redaction: nothing secret or local leaves the machine, everything else survives.

The corpus is built at import time from fixed pieces and a seeded generator, so
no file in the repository holds a string a secret scanner would flag.
"""

from __future__ import annotations

import base64
import copy
import json
import random
import string
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opencode_env import CAPTURES_DIR

from edges.common._redaction import (
    ARTIFACT_REDACTED,
    DEPTH_REDACTED,
    LOCAL_FILE_URL,
    LOCAL_PATH,
    MAX_STRING_CHARS,
    MCP_REDACTED,
    MORE_KEYS,
    TRUNCATED,
    RedactionPolicy,
    redact,
    redact_event,
    redact_text,
)
from schemas._secrets import SECRET_REDACTED, scrub_text

CAPTURES = sorted(str(p) for p in CAPTURES_DIR.glob("*.sse"))
NONE = RedactionPolicy()
ALL = RedactionPolicy(
    expose_artifact_bodies=True, expose_local_paths=True, expose_local_mcp_details=True
)

# ---------------------------------------------------------------------------
# the corpus of fake secrets

ALNUM = string.ascii_letters + string.digits
B64URL = ALNUM + "-_"
HEX = "0123456789abcdef"
UPPER_DIGITS = string.ascii_uppercase + string.digits
BASE32 = string.ascii_uppercase + "234567"


@dataclass(frozen=True)
class Fake:
    name: str
    raw: str  # how it appears in text
    secrets: tuple[str, ...]  # the parts that must never come out, nor 12 characters of them


def _b64url(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def _corpus() -> list[Fake]:
    rng = random.Random(1729)

    def pick(n: int, alphabet: str = ALNUM) -> str:
        return "".join(rng.choice(alphabet) for _ in range(n))

    def digits(n: int) -> str:
        return str(rng.randint(1, 9)) + pick(n - 1, string.digits)

    out: list[Fake] = []

    def add(name: str, raw: str, *secrets: str) -> None:
        out.append(Fake(name, raw, secrets or (raw,)))

    add("openai-legacy", "sk-" + pick(20) + "T3BlbkFJ" + pick(20))
    add("openai-project", "sk-" + "proj-" + pick(74, B64URL) + "A" + pick(5))
    add("openai-service-account", "sk-" + "svcacct-" + pick(60, B64URL) + "Q")
    add("anthropic", "sk-" + "ant-api03-" + pick(93, B64URL) + "AA")
    add("openrouter", "sk-" + "or-v1-" + pick(64, HEX))
    add("google-api-key", "AI" + "za" + pick(35, B64URL))
    add("google-oauth-access", "ya" + "29." + "a0" + pick(120, B64URL))
    add("google-client-secret", "GOC" + "SPX-" + pick(28, B64URL))
    add("google-refresh", "1//0" + "g" + pick(100, B64URL))
    add("slack-bot", "xo" + "xb-" + digits(12) + "-" + digits(13) + "-" + pick(24))
    add(
        "slack-user",
        "xo" + "xp-" + digits(12) + "-" + digits(12) + "-" + digits(13) + "-" + pick(32, HEX),
    )
    add(
        "slack-app",
        "xa" + "pp-1-A" + pick(10, UPPER_DIGITS) + "-" + digits(13) + "-" + pick(64, HEX),
    )
    hook = pick(24)
    add(
        "slack-webhook",
        "https://hooks.slack.com/services/T"
        + pick(8, UPPER_DIGITS)
        + "/B"
        + pick(10, UPPER_DIGITS)
        + "/"
        + hook,
        hook,
    )
    add("telegram-bot", digits(10) + ":AA" + pick(33, B64URL))
    add("github-classic", "gh" + "p_" + pick(36))
    add("github-oauth", "gh" + "o_" + pick(36))
    add("github-app", "gh" + "s_" + pick(36))
    add("github-fine-grained", "github" + "_pat_" + pick(22) + "_" + pick(59))
    add("gitlab", "gl" + "pat-" + pick(20, B64URL))
    add("aws-access-key-id", "AK" + "IA" + pick(16, UPPER_DIGITS))
    aws_secret = pick(40, ALNUM + "+/")
    add("aws-secret-assignment", "aws_secret_access_key = " + aws_secret, aws_secret)
    add("stripe-secret", "sk" + "_live_" + pick(24))
    add("stripe-restricted", "rk" + "_live_" + pick(24))
    add("webhook-secret", "wh" + "sec_" + pick(32))
    header = _b64url({"alg": "HS256", "typ": "JWT"})
    payload = _b64url({"sub": pick(12), "iat": 1716800000, "scope": "admin"})
    signature = pick(43, B64URL)
    add("jwt", f"{header}.{payload}.{signature}", payload, signature)
    bearer = pick(40, ALNUM + "._-~")
    add("bearer", "Bearer " + bearer, bearer)
    basic = base64.b64encode(f"deploy:{pick(18)}".encode()).decode()
    add("basic", "Basic " + basic, basic)
    token = pick(40, HEX)
    add("token-scheme", "Authorization: Token " + token, token)
    pem_lines = [pick(64, ALNUM + "+/") for _ in range(6)]
    add(
        "pem-rsa",
        "-----BEGIN RSA PRIVATE KEY-----\n"
        + "\n".join(pem_lines)
        + "\n-----END RSA PRIVATE KEY-----",
        *pem_lines,
    )
    ssh_lines = [pick(70, ALNUM + "+/") for _ in range(4)]
    add(
        "pem-openssh",
        "-----BEGIN OPENSSH PRIVATE KEY-----\n"
        + "\n".join(ssh_lines)
        + "\n-----END OPENSSH PRIVATE KEY-----",
        *ssh_lines,
    )
    for kind in ("SU", "SA", "SO"):
        add(f"nkey-seed-{kind}", kind + pick(56, BASE32))
    password = pick(14) + "!x"
    add("url-credentials", f"https://deploy:{password}@git.example.com/org/repo.git", password)
    db_password = pick(16)
    add("dsn-credentials", f"postgresql://app:{db_password}@db.internal:5432/app", db_password)
    add("discord-bot", "M" + pick(25) + "." + pick(6, B64URL) + "." + pick(38, B64URL))
    discord_hook = pick(68, B64URL)
    add(
        "discord-webhook",
        "https://discord.com/api/webhooks/" + digits(18) + "/" + discord_hook,
        discord_hook,
    )
    add("twilio-api-key", "S" + "K" + pick(32, HEX))
    add("huggingface", "h" + "f_" + pick(34))
    add("npm", "np" + "m_" + pick(36))
    env_value = "pl41n" + pick(22)
    add("env-assignment", "OPENAI_API_KEY=" + env_value, env_value)
    pw = "Tr0ub4dor-" + pick(8)
    add("password-colon", "password: " + pw, pw)
    quoted = "correct horse battery " + pick(8)
    add("quoted-password", f"DB_PASSWORD='{quoted}'", quoted)
    client_secret = pick(30)
    add("json-in-text", f'"client_secret": "{client_secret}"', client_secret)
    session_cookie, csrf = pick(32), pick(32)
    add(
        "cookie-header", f"Cookie: session={session_cookie}; csrftoken={csrf}", session_cookie, csrf
    )
    flag = pick(32, HEX)
    add("cli-flag", "--api-key " + flag, flag)
    return out


CORPUS = _corpus()


def _windows(secret: str, size: int = 12) -> list[str]:
    parts = [p for p in secret.split("\n") if p]
    if all(len(p) < size for p in parts):
        return parts
    return [p[i : i + size] for p in parts if len(p) >= size for i in range(len(p) - size + 1)]


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _strings(k) + _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def assert_no_secret(output, fakes=CORPUS):
    dumped = json.dumps(output, ensure_ascii=False)
    texts = "\x00".join(_strings(output))
    for fake in fakes:
        assert fake.raw not in dumped and fake.raw not in texts, fake.name
        for secret in fake.secrets:
            for window in _windows(secret):
                assert window not in dumped and window not in texts, (fake.name, window)


def nest(value, depth: int):
    """`value` inside `depth` containers, alternating dicts and lists."""
    for level in range(depth):
        value = {"level": level, "child": value} if level % 2 else [value, level]
    return value


def test_corpus_is_big_and_distinct():
    assert len(CORPUS) >= 25
    assert len({f.name for f in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("fake", CORPUS, ids=lambda f: f.name)
def test_secret_under_a_harmless_key(fake):
    out = redact({"note": fake.raw, "value": [fake.raw]}, ALL)
    assert_no_secret(out, [fake])


@pytest.mark.parametrize("fake", CORPUS, ids=lambda f: f.name)
def test_secret_inside_prose(fake):
    prose = f"Sure, I found this in your config:\n{fake.raw} (please rotate it soon)."
    out = redact({"delta": prose}, ALL)
    assert_no_secret(out, [fake])
    assert out["delta"].startswith("Sure, I found this in your config:")
    assert out["delta"].endswith("(please rotate it soon).") or fake.name in (
        "pem-rsa",
        "pem-openssh",
        "cookie-header",
        "quoted-password",
    )


@pytest.mark.parametrize("depth", range(1, 8))
@pytest.mark.parametrize("fake", CORPUS, ids=lambda f: f.name)
def test_secret_nested_at_any_depth(fake, depth):
    value = nest({"text": f"see {fake.raw} here"}, depth)
    assert_no_secret(redact(value, ALL), [fake])
    assert_no_secret(redact(value, NONE), [fake])


@pytest.mark.parametrize("fake", CORPUS, ids=lambda f: f.name)
def test_secret_in_a_url(fake):
    url = f"https://example.com/callback?ref=7&note={fake.raw}&page=2"
    out = redact({"metadata": {"url": url}, "links": [url]}, ALL)
    assert_no_secret(out, [fake])
    assert out["metadata"]["url"].startswith("https://example.com/callback?ref=7&note=")


@pytest.mark.parametrize("fake", CORPUS, ids=lambda f: f.name)
def test_secret_as_a_dict_key(fake):
    out = redact({fake.raw: 1, "ok": 2}, ALL)
    assert_no_secret(out, [fake])
    assert out["ok"] == 2


def test_tokens_in_provider_urls():
    by_name = {f.name: f for f in CORPUS}
    urls = [
        f"https://api.telegram.org/bot{by_name['telegram-bot'].raw}/getMe",
        f"https://www.googleapis.com/youtube/v3/search?part=id&key={by_name['google-api-key'].raw}",
        f"wss://relay.example.com/socket?access_token={by_name['jwt'].raw}",
        f"https://gitlab.example.com/api/v4/projects?private_token={by_name['gitlab'].raw}",
    ]
    out = redact({"metadata": {"url": urls}}, ALL)
    assert_no_secret(out)
    assert out["metadata"]["url"][0].startswith("https://api.telegram.org/bot")
    assert out["metadata"]["url"][0].endswith("/getMe")


def test_generic_assignments_keep_the_key():
    assert scrub_text("export GITHUB_TOKEN=abc123def") == f"export GITHUB_TOKEN={SECRET_REDACTED}"
    assert scrub_text("password: hunter2") == f"password: {SECRET_REDACTED}"
    assert scrub_text("?access_token=xyz&page=2") == f"?access_token={SECRET_REDACTED}&page=2"
    assert scrub_text("Authorization: Bearer abc") == f"Authorization: Bearer {SECRET_REDACTED}"
    assert (
        scrub_text("curl -u admin:s3cret https://x") == f"curl -u admin:{SECRET_REDACTED} https://x"
    )
    # counts and words that merely contain a secret word are not assignments
    for text in (
        "max_tokens=4096",
        "tokenizer: bpe",
        "author: Jane",
        "tokens: 12",
        "token: null",
        "The session key idea: simple.",
    ):
        assert scrub_text(text) == text


# ---------------------------------------------------------------------------
# property: random JSON-like values with planted secrets

SEPARATORS = [" ", "\n", "\t", "(", ")", ",", ";", "|", "<", ">", '"', "'"]
filler = st.text(max_size=24)
planted = st.tuples(
    filler,
    st.sampled_from(SEPARATORS),
    st.sampled_from(CORPUS).map(lambda f: f.raw),
    st.sampled_from(SEPARATORS),
    filler,
).map("".join)
texts = st.one_of(filler, planted)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), texts)
keys = st.one_of(
    st.sampled_from(
        [
            "note",
            "text",
            "delta",
            "id",
            "output",
            "items",
            "url",
            "body",
            "env",
            "directory",
            "apiKey",
            "path",
        ]
    ),
    filler,
)
json_like = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.tuples(children, children),
        st.dictionaries(keys, children, max_size=6),
    ),
    max_leaves=40,
)
policies = st.builds(RedactionPolicy, st.booleans(), st.booleans(), st.booleans())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_like, policy=policies)
def test_property_no_planted_secret_survives_and_redaction_is_idempotent(value, policy):
    before = copy.deepcopy(value)
    once = redact(value, policy)
    assert value == before  # the input is never modified
    assert_no_secret(once)
    assert redact(once, policy) == once


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200), policy=policies)
def test_property_any_text_is_redacted_idempotently(text, policy):
    once = redact_text(text, policy)
    assert redact_text(once, policy) == once


# ---------------------------------------------------------------------------
# the contract's rules, one by one

SECRET_KEYS = [
    "token",
    "accessToken",
    "refresh_token",
    "X-Api-Key",
    "api_key",
    "apikey",
    "clientSecret",
    "PASSWORD",
    "db_password",
    "credentials",
    "authorization",
    "Set-Cookie",
    "cookie",
    "refresh",
    "refreshAt",
    "tokenUsage",
    "tokensSecret",
]


@pytest.mark.parametrize("policy", [NONE, ALL])
@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_keys_are_always_redacted(key, policy):
    for value in ("plain", {"nested": "x"}, ["a"], 42, None):
        assert redact({key: value}, policy) == {key: SECRET_REDACTED}


@pytest.mark.parametrize(
    "key", ["command", "args", "env", "cwd", "stdio", "process", "pid", "serverPath"]
)
def test_local_mcp_details(key):
    value = {"sub": "npx server", "GITHUB_TOKEN": "x", "note": CORPUS[0].raw}
    assert redact({key: value}, NONE) == {key: MCP_REDACTED}
    exposed = redact({key: value}, RedactionPolicy(expose_local_mcp_details=True))
    assert exposed[key]["sub"] == "npx server"
    assert exposed[key]["GITHUB_TOKEN"] == SECRET_REDACTED  # secrets stay redacted
    assert exposed[key]["note"] == SECRET_REDACTED
    # only these exact keys: similar ones pass
    assert redact({"commandId": "c1", "Command": "x", "pids": 1}, NONE) == {
        "commandId": "c1",
        "Command": "x",
        "pids": 1,
    }


def test_usage_counts_are_not_secrets_but_their_values_are_scrubbed():
    usage = {"input": 10, "output": 3, "reasoning": 0, "cache": {"read": 1, "write": 0}}
    event = {
        "info": {
            "id": "ses_1",
            "tokens": usage,
            "maxTokens": 4096,
            "outputTokens": "ghp_" + "a" * 36,
        }
    }
    out = redact(event, NONE)
    assert out["info"]["tokens"] == usage and out["info"]["maxTokens"] == 4096
    assert out["info"]["outputTokens"] == SECRET_REDACTED  # a token-shaped value still goes
    assert redact({"token": 5, "accessTokens": "x"}, NONE) == {
        "token": SECRET_REDACTED,
        "accessTokens": SECRET_REDACTED,
    }


@pytest.mark.parametrize("policy", [NONE, RedactionPolicy(expose_local_mcp_details=True)])
def test_path_bearing_fields_are_redacted_by_field(policy):
    # OpenCode outside git: the worktree is "/", so `path` is the directory without its slash
    info = {
        "id": "ses_1",
        "directory": "/home/alice/clients/acme",
        "worktree": "/",
        "path": "home/alice/clients/acme",
        "root": "clients/acme",
        "title": "t",
    }
    part = {
        "type": "file",
        "mime": "text/plain",
        "filename": "alice-notes/secret-plan.txt",
        "url": "file:///home/alice/secret-plan.txt",
        "source": {"path": "alice-notes/secret-plan.txt", "type": "file"},
    }
    out = redact({"info": info, "parts": [part], "cwd": "alice/x", "path": ""}, policy)
    assert "alice" not in json.dumps(out), out
    assert out["info"]["path"] == out["info"]["root"] == LOCAL_PATH
    assert out["info"]["directory"] is None and out["info"]["title"] == "t"
    assert out["parts"][0]["filename"] == LOCAL_PATH and out["path"] == ""
    assert out["parts"][0]["mime"] == "text/plain"
    exposed = redact(info, RedactionPolicy(expose_local_paths=True))
    assert exposed["path"] == "home/alice/clients/acme"
    # a filename outside a file part is only a name
    assert redact({"filename": "report.pdf"}, NONE) == {"filename": "report.pdf"}


def test_what_postgresql_cannot_store_never_leaves_the_desktop():
    out = redact({"output": "bin\x00ary \ud800 ok", "k\x00": ["\x00"]}, NONE)
    assert out == {"output": "bin\ufffdary \ufffd ok", "k\ufffd": ["\ufffd"]}


def test_exposed_mcp_details_still_hide_local_paths():
    event = {"path": {"cwd": "/home/dev/project-a", "root": "/home/dev/project-a"}}
    out = redact(event, RedactionPolicy(expose_local_mcp_details=True))
    assert out == {"path": {"cwd": LOCAL_PATH, "root": LOCAL_PATH}}
    assert redact(event, NONE) == {"path": {"cwd": MCP_REDACTED, "root": LOCAL_PATH}}


@pytest.mark.parametrize("key", ["body", "contentBase64", "dataBase64"])
def test_artifact_bodies(key):
    value = "aGVsbG8gd29ybGQ= see /home/dev/a.txt and " + CORPUS[1].raw
    assert redact({key: value}, NONE) == {key: ARTIFACT_REDACTED}
    exposed = redact({key: value}, RedactionPolicy(expose_artifact_bodies=True))
    assert exposed[key] == f"aGVsbG8gd29ybGQ= see {LOCAL_PATH} and {SECRET_REDACTED}"
    both = redact(
        {key: value}, RedactionPolicy(expose_artifact_bodies=True, expose_local_paths=True)
    )
    assert both[key] == f"aGVsbG8gd29ybGQ= see /home/dev/a.txt and {SECRET_REDACTED}"


@pytest.mark.parametrize(
    "path",
    [
        "/Users/alice/Documents/plan.md",
        "/home/dev/project-a",
        "/private/var/folders/xy/T/tmp1",
        "/var/lib/app/data.db",
        "/tmp/opencode-1234/log.txt",
        "/Volumes/Backup/x",
        "/root/.ssh/config",
        r"C:\Users\alice\repo\main.py",
        "D:/work/repo",
        r"\\fileserver\share\team\doc.txt",
        r"\/home\/dev\/escaped.json",
        "%2Fhome%2Fdev%2Fproject-a",
    ],
)
def test_local_paths(path):
    text = f"opened ({path}) and edited"
    assert redact(text, NONE) == f"opened ({LOCAL_PATH}) and edited"
    assert redact(text, RedactionPolicy(expose_local_paths=True)) == text
    assert redact(path, NONE) == LOCAL_PATH


def test_file_urls():
    text = "open file:///home/dev/project-a/README.md or FILE://C:/Users/a/b.txt now"
    assert redact(text, NONE) == f"open {LOCAL_FILE_URL} or {LOCAL_FILE_URL} now"
    assert redact(text, RedactionPolicy(expose_local_paths=True)) == text


def test_paths_that_are_not_local_survive():
    for text in (
        "https://example.com/home/user/profile",
        "see src/home/index.ts",
        "/usr/bin/env python3",
        "/etc/hosts",
        "a ratio of 3/4",
        "and/or",
        "GET /session/{id}/message",
        "cd ~/project",
        "http://localhost:4096/tmp",
    ):
        assert redact(text, NONE) == text


def test_directory_becomes_null():
    event = {
        "info": {"id": "ses_1", "directory": "/home/dev/project-a", "title": "x"},
        "directory": "global",
    }
    assert redact(event, NONE) == {
        "info": {"id": "ses_1", "directory": None, "title": "x"},
        "directory": None,
    }
    assert redact(event, RedactionPolicy(expose_local_paths=True)) == event


def test_string_limit():
    exact = "a" * MAX_STRING_CHARS
    assert redact(exact, NONE) == exact
    long = "b" * (MAX_STRING_CHARS + 1)
    out = redact(long, NONE)
    assert out == "b" * MAX_STRING_CHARS + TRUNCATED
    huge = "word " * 400_000  # 2 MB
    started = time.perf_counter()
    assert len(redact({"output": huge}, NONE)["output"]) == MAX_STRING_CHARS + len(TRUNCATED)
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("fake", CORPUS, ids=lambda f: f.name)
def test_secret_straddling_the_string_cut(fake):
    for offset in (1, 5, 12, len(fake.raw) // 2, len(fake.raw) - 1):
        text = "x " * ((MAX_STRING_CHARS - offset) // 2) + fake.raw + " tail" * 10
        assert_no_secret(redact(text, NONE), [fake])


def test_shrinking_replacements_cannot_pull_a_cut_secret_into_view():
    # thousands of paths shrink the head; the text past the first cut must still be scrubbed
    fake = CORPUS[0]
    text = "/home/dev/project-a/src/module/file.py\n" * 1200 + fake.raw + "\n"
    out = redact(text, NONE)
    assert_no_secret(out, [fake])
    assert "/home/dev" not in out


def test_array_limit():
    assert redact(list(range(50)), NONE) == list(range(50))
    out = redact(list(range(60)), NONE)
    assert len(out) == 50 and out[:49] == list(range(49))
    assert out[-1] == "[11 more item(s) redacted]"
    assert redact(out, NONE) == out


def test_object_limit():
    hundred = {f"k{i}": i for i in range(100)}
    assert redact(hundred, NONE) == hundred
    out = redact({f"k{i}": i for i in range(130)}, NONE)
    assert len(out) == 100 and out[MORE_KEYS] == "31 more key(s)"
    assert [k for k in out if k != MORE_KEYS] == [f"k{i}" for i in range(99)]
    assert redact(out, NONE) == out


def test_depth_limit():
    def lists(n, leaf="leaf"):
        for _ in range(n):
            leaf = [leaf]
        return leaf

    assert redact(lists(7), NONE) == lists(7)  # containers at depths 0..6 are kept
    assert redact(lists(8), NONE) == lists(7, DEPTH_REDACTED)
    deep = {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": 1}}}}}}}}
    assert redact(deep, NONE) == {"a": {"b": {"c": {"d": {"e": {"f": {"g": DEPTH_REDACTED}}}}}}}


def test_input_is_never_mutated_and_output_is_a_copy():
    event = {
        "properties": {
            "info": {"directory": "/home/dev/x", "env": {"A": "1"}},
            "parts": [{"text": "see /tmp/x", "body": "abc"}],
            "pair": ("a", "/Users/x/y"),
        }
    }
    before = copy.deepcopy(event)
    out = redact(event, ALL)
    assert event == before
    assert out == before and out is not event
    assert out["properties"]["parts"] is not event["properties"]["parts"]
    out["properties"]["parts"].append("mutated")
    assert event == before
    assert isinstance(out["properties"]["pair"], tuple)


def test_odd_values_never_raise():
    value = {
        "b": b"\x00raw",
        "s": {1, 2},
        "o": object(),
        3: "int key",
        None: "none key",
        "f": 1.5,
        "t": (1, [2, {"x": None}]),
        "big": 10**30,
    }
    out = redact(value, NONE)
    assert out["b"] == out["s"] == out["o"] == "[unsupported]"
    assert out[3] == "int key" and out[None] == "none key" and out["big"] == 10**30


def test_keys_redacted_to_the_same_text_are_both_kept():
    out = redact({"/home/a": 1, "/home/b": 2}, NONE)
    assert sorted(out.values()) == [1, 2]
    assert all(k.startswith(LOCAL_PATH) for k in out)


def test_policy_from_the_pairing_policy():
    assert RedactionPolicy.from_policy(None) == NONE
    assert RedactionPolicy.from_policy({}) == NONE
    policy = RedactionPolicy.from_policy(
        {
            "allowRemotePrompts": True,
            "exposeArtifactBodies": True,
            "exposeLocalPaths": "true",
            "exposeLocalMcpDetails": 1,
            "expose_local_paths": True,
        }
    )
    assert policy == RedactionPolicy(expose_artifact_bodies=True)
    assert (
        RedactionPolicy.from_policy(
            {"exposeArtifactBodies": True, "exposeLocalPaths": True, "exposeLocalMcpDetails": True}
        )
        == ALL
    )


# ---------------------------------------------------------------------------
# false positives

PROSE = [
    "Hello! I can help you refactor that function; here's the plan for the module.",
    "The disk-usage-monitoring-tool reports the task-scheduler-configuration as healthy.",
    "Use a basic internationalization approach and a bearer of good news.",
    "Set max_tokens=4096 and temperature: 0.2, then call the tokenizer.",
    "See https://github.com/sst/opencode/blob/dev/README.md for details.",
    "Run `git log --oneline -5` and `npm run build --if-present`.",
    "Passwords should be long; secrets belong in a vault; tokens expire.",
    "The author wrote: authentication uses OAuth2 with PKCE.",
    "sk-learn-compatible estimators are fine, and so is the sk-fake test key.",
    "Tokens: input 1200, output 300 (cache read 0).",
    "Version 1.18.33 was released on 2026-05-27T10:00:00.000Z; PID namespaces differ.",
    "A 24-character word: internationalizations and counterrevolutionaries exist.",
    "SELECT id, name FROM users WHERE id = 42;",
    "def f(x: int) -> int:\n    return x * 2  # see ./src/home/utils.py",
]
IDS = [
    "ses_df39c50efffetUqIde65vCZWgj",
    "ses_01JX4K9Z3Q7W8E5R6T2Y1U0I9O",
    "msg_20c63afa1001lpoBTkYsthR59n",
    "prt_20c63afa7001oHdLwh1pxfJj7G",
    "evt_20c63ab110010VgD21Pg0QJRTR",
    "per_20c6515a2001fgHxOCbB187J8t",
    "que_20c65159b001aSN7s73H7ggL7k",
    "call_fake_1",
    "pairing-1",
    "550e8400-e29b-41d4-a716-446655440000",
    "3f786850e387550fdab836ed7e6dc881de23001b",
    "3f786850e38",
    "01JX4K9Z3Q7W8E5R6T2Y1U0I9O",
    "sha256:" + "ab" * 32,
    "UABCDEFGHIJKLMNOPQRSTUVWXYZ234567ABCDEFGHIJKLMNOPQRSTUVWX",  # a NATS user public key
]


@pytest.mark.parametrize("text", PROSE + IDS)
def test_ordinary_text_and_ids_survive(text):
    assert redact(text, NONE) == text
    assert redact({"note": text, "id": text}, NONE) == {"note": text, "id": text}


# ---------------------------------------------------------------------------
# real OpenCode events


def _events():
    for path in CAPTURES:
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            if line.startswith("data: "):
                yield f"{Path(path).stem}:{number}", json.loads(line[len("data: ") :])


EVENTS = list(_events())
ID_KEYS = {
    "id",
    "sessionID",
    "messageID",
    "partID",
    "parentID",
    "requestID",
    "callID",
    "aggregateID",
    "projectID",
    "providerID",
    "modelID",
    "type",
    "field",
    "slug",
    "title",
}


def _ids(value, path=()):
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ID_KEYS and isinstance(item, str):
                yield path + (key,), item
            yield from _ids(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _ids(item, path + (index,))


def _at(value, path):
    for step in path:
        value = value[step]
    return value


def test_captures_are_present():
    assert len(CAPTURES) >= 10 and len(EVENTS) > 400


@pytest.mark.parametrize("name,event", EVENTS, ids=[name for name, _ in EVENTS])
def test_capture_event(name, event):
    before = copy.deepcopy(event)
    out = redact_event(event, NONE)
    assert event == before
    dumped = json.dumps(out)
    assert "/home/dev" not in dumped and "file://" not in dumped
    for path, value in _ids(event):
        try:
            assert _at(out, path) == value, path
        except (KeyError, TypeError):  # under a redacted or depth-limited parent
            assert len(path) > 6 or any(
                isinstance(_at(out, path[:i]), str) for i in range(1, len(path))
            )
    inner = event.get("payload", event)
    if inner.get("type") in ("message.part.delta",):
        assert (
            _at(out, ("payload",) if "payload" in event else ())["properties"]
            == inner["properties"]
        )
    if (
        inner.get("type") == "message.part.updated"
        and inner["properties"]["part"]["type"] == "text"
    ):
        target = out.get("payload", out)
        assert target["properties"]["part"]["text"] == inner["properties"]["part"]["text"]
    # exposing local paths gives the directory back untouched
    exposed = redact_event(event, RedactionPolicy(expose_local_paths=True))
    if isinstance(event.get("directory"), str):
        assert exposed["directory"] == event["directory"]


def test_capture_session_directory_and_message_paths():
    (name, created), *_ = [(n, e) for n, e in EVENTS if e.get("type") == "session.created"]
    out = redact_event(created, NONE)
    assert out["properties"]["info"]["directory"] is None
    assert out["properties"]["info"]["id"] == created["properties"]["info"]["id"]
    assistant = next(
        e
        for _, e in EVENTS
        if e.get("type") == "message.updated" and "path" in e["properties"]["info"]
    )
    path = redact_event(assistant, NONE)["properties"]["info"]["path"]
    assert path == {"cwd": MCP_REDACTED, "root": LOCAL_PATH}


def test_model_error_and_permission_events():
    key = CORPUS[0].raw
    error = {
        "id": "evt_1",
        "type": "session.error",
        "properties": {
            "sessionID": "ses_1",
            "error": {
                "name": "APIError",
                "data": {
                    "message": f"Incorrect API key provided: {key}",
                    "statusCode": 401,
                    "isRetryable": False,
                    "responseHeaders": {
                        "authorization": "Bearer abc",
                        "set-cookie": "a=b",
                        "x-request-id": "req_123",
                        "openai-organization": "org-1",
                    },
                    "responseBody": json.dumps(
                        {"error": {"message": "bad key " + key, "api_key": "plain-value-1234"}}
                    ),
                    "metadata": {"url": f"https://api.example.com/v1/chat?key={CORPUS[5].raw}"},
                },
            },
        },
    }
    out = redact_event(error, NONE)
    data = out["properties"]["error"]["data"]
    assert_no_secret(out)
    assert "plain-value-1234" not in json.dumps(out)
    assert data["responseHeaders"] == {
        "authorization": SECRET_REDACTED,
        "set-cookie": SECRET_REDACTED,
        "x-request-id": "req_123",
        "openai-organization": "org-1",
    }
    assert data["statusCode"] == 401 and out["type"] == "session.error" and out["id"] == "evt_1"

    asked = {
        "id": "evt_2",
        "type": "permission.asked",
        "properties": {
            "id": "per_1",
            "sessionID": "ses_1",
            "permission": "bash",
            "patterns": ["rm -rf /home/dev/project-a/build"],
            "metadata": {"command": "rm -rf /home/dev/project-a/build"},
            "always": ["rm *"],
            "tool": {"messageID": "msg_1", "callID": "call_1"},
        },
    }
    out = redact_event(asked, NONE)
    assert out["properties"]["metadata"] == {"command": MCP_REDACTED}
    assert out["properties"]["patterns"] == [f"rm -rf {LOCAL_PATH}"]
    assert (
        out["properties"]["id"] == "per_1"
        and out["properties"]["tool"] == asked["properties"]["tool"]
    )


# ---------------------------------------------------------------------------
# speed (make bench): a streamed delta must cost microseconds


@pytest.mark.bench
def test_delta_redaction_is_fast():
    deltas = [e for _, e in EVENTS if e.get("type") == "message.part.delta"]
    unique = []
    for i in range(5000):
        event = copy.deepcopy(deltas[i % len(deltas)])
        event["properties"]["delta"] += f" and word{i} of ordinary streamed prose."
        unique.append(event)
    started = time.perf_counter()
    for event in unique:
        redact_event(event, NONE)
    per_event = (time.perf_counter() - started) / len(unique)
    assert per_event < 50e-6, f"{per_event * 1e6:.1f} us per delta event"
