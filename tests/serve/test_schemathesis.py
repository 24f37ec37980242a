"""schemathesis against a live server's /openapi.json (real uvicorn on 127.0.0.1, the tiny Llama,
two adapters): for every operation, requests generated from the published schema, valid ones
(positive) and ones that break it (negative). No response may be a server error, and each must
match what the schema promises: its status, content type, headers and body, and an invalid
request refused. `make test` sends a few per operation and mode; the slow test many more, then
schemathesis' own runner (`st run`: examples, coverage, fuzzing and stateful phases).

Not checked: that every schema-valid request is accepted (`positive_data_acceptance`). The
schema states each field; some rules span fields or need the server's state, and those answer
400/404/413: a tool message needs a tool_call_id, tool_choice names one of the tools, an adapter
name that fits the pattern has no folder, a prompt is over the server's token limit or with
max_tokens past the model's positions.

schemathesis' Python API (`as_strategy` under Hypothesis' `@given`) is used rather than its
pytest plugin, whose lazy `from_fixture` loader reads a node attribute pytest 9 removed."""

import collections
import subprocess
import sys

import pytest

from lorakit.serve.app import ServerThread, create_app
from tests.serve.builders import http_service

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import Failure, FailureGroup  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance, negative_data_rejection, response_headers_conformance,
    response_schema_conformance, status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, negative_data_rejection]


@pytest.fixture
def live(llama, tokenizer, tmp_path):
    service = http_service(llama, tokenizer, tmp_path, adapters=2, max_tokens=16,
                           default_max_tokens=4)
    with ServerThread(create_app(service)) as srv:
        yield srv.url, service


def run_operations(url: str, base_name: str, examples: int, seed_value: int
                   ) -> collections.Counter:
    """Every operation, positive then negative, `examples` cases each; the failures are collected
    (not shrunk) and reported together. Every other valid generation body names `base_name` as
    its model, so it is answered by the engine rather than 404 (a chat body with one plain user
    turn). Returns the count of (operation,
    status) answered."""
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    answered: collections.Counter = collections.Counter()
    failures, skipped, generated = [], [], [0]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14, [op.label for op in operations]
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            generated[0] = 0  # the 1st, 3rd, ... valid body of each operation names the base
            @seed(seed_value)
            @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def one(case):
                generated[0] += 1
                if (mode == GenerationMode.POSITIVE and isinstance(case.body, dict)
                        and "model" in case.body and generated[0] % 2):
                    case.body["model"] = base_name  # a model that exists, so it reaches the engine
                    if "messages" in case.body:
                        # Roles and tool turns have rules across fields the schema does not state
                        # (a tool message needs a tool_call_id): one plain turn gets through.
                        case.body["messages"] = [{"role": "user", "content": "hello"}]
                try:
                    response = case.call_and_validate(checks=CHECKS, timeout=60)
                    answered[(op.label, response.status_code)] += 1
                except (Failure, FailureGroup) as e:
                    failures.append(f"{op.label} ({mode}): {str(e)[:600]}")

            try:
                one()
            except Unsatisfiable:  # nothing to make invalid: no body, any string a name
                assert mode == GenerationMode.NEGATIVE, op.label
                skipped.append(op.label)
    assert not failures, f"{len(failures)} failures:\n" + "\n\n".join(failures[:10])
    assert not {"POST /v1/completions", "POST /v1/chat/completions", "POST /admin/adapters"} & set(
        skipped), skipped
    return answered


def test_schema_fast(live):
    url, service = live
    answered = run_operations(url, service.base_name, examples=6, seed_value=16)
    assert sum(answered.values()) >= 100
    # Generated requests reached the model (a valid body names the base: the schema's example).
    assert answered[("POST /v1/completions", 200)] > 0 and answered[("POST /v1/chat/completions", 200)] > 0
    assert service.engine.healthy and not service.engine.running


@pytest.mark.slow
def test_schema_slow(live):
    url, service = live
    answered = run_operations(url, service.base_name, examples=100, seed_value=1616)
    assert sum(answered.values()) >= 1000
    assert service.engine.healthy


@pytest.mark.slow
def test_schemathesis_runner(live):
    """`st run` with all four phases and every check but positive_data_acceptance: exit 0."""
    url, service = live
    st = [sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()"]
    r = subprocess.run(st + ["run", url + "/openapi.json", "--checks", "all", "--exclude-checks",
                             "positive_data_acceptance", "--max-examples", "100",
                             "--seed", "16", "--no-color"], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-6000:]
    assert "passed" in r.stdout and service.engine.healthy
