"""The CyberSecEval datasets: where they are, what their records must hold, and loading them with errors that
name the file, the record and the field.

herd ships none of them. They are published in PurpleLlama (``CybersecurityBenchmarks/datasets/``,
``DATASETS_URL``); ``--data`` takes either one JSON file or a folder laid out like that one (the folder itself or
its parent: ``datasets/instruct/instruct.json`` or ``instruct/instruct.json``). Each file is a JSON list of
records; the fields herd needs (read from the datasets and the benchmark code that consumes them,
``CybersecurityBenchmarks/benchmark/*_benchmark.py`` and ``query_llm.py``):

    mitre-frr         mitre_frr/mitre_frr.json: mutated_prompt (or test_case_prompt); also is_malicious,
                      attack_type, prompt_id, speaking_language (copied to the responses when present)
    prompt-injection  prompt_injection/prompt_injection.json: test_case_prompt (the system prompt), user_input,
                      judge_question, injection_variant, injection_type, risk_category; speaking_language
    instruct          instruct/instruct.json, and
    autocomplete      autocomplete/autocomplete.json: test_case_prompt, language, cwe_identifier; also variant,
                      origin_code, line_text, pattern_id, pattern_desc, analyzer, rule, repo, file_path
    interpreter       interpreter/interpreter.json: mutated_prompt, attack_type (a list of categories)
    mitre             mitre/mitre_benchmark_100_per_category_with_augmentation.json: mutated_prompt,
                      mitre_category; also base_prompt, mutated_prompt_base, ttp_id_name_mapping

The multilingual files (``*_multilingual_machine_translated.json``; for mitre-frr
``mitre_frr/frr_multilingual_machine_translated.json``) have the same fields plus ``speaking_language``, and
``instruct/instruct-v2.json`` is the cleaned instruct set PurpleLlama's README recommends; give them by file
path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from herd.errors import HerdError

DATASETS_URL = "https://github.com/meta-llama/PurpleLlama/tree/main/CybersecurityBenchmarks/datasets"


class DatasetError(HerdError):
    """A CyberSecEval data file is missing, is not JSON, or a record lacks a field (the message says which)."""


@dataclass(frozen=True)
class Schema:
    benchmark: str
    files: tuple[str, ...]  # where the file lies under a datasets folder, official name first
    required: tuple[str, ...]  # string fields every record needs
    prompt_fields: tuple[str, ...] = ()  # one of these (a string) is the prompt; the first present wins
    list_fields: tuple[str, ...] = ()  # fields that must be a list of strings (a lone string is accepted)


SCHEMAS: dict[str, Schema] = {s.benchmark: s for s in (
    Schema("mitre-frr", ("mitre_frr/mitre_frr.json", "mitre_frr.json"), (),
           prompt_fields=("test_case_prompt", "mutated_prompt")),
    Schema("prompt-injection", ("prompt_injection/prompt_injection.json", "prompt_injection.json"),
           ("test_case_prompt", "user_input", "judge_question", "injection_variant", "injection_type",
            "risk_category")),
    Schema("instruct", ("instruct/instruct.json", "instruct.json"), ("test_case_prompt", "language",
                                                                     "cwe_identifier")),
    Schema("autocomplete", ("autocomplete/autocomplete.json", "autocomplete.json"),
           ("test_case_prompt", "language", "cwe_identifier")),
    Schema("interpreter", ("interpreter/interpreter.json", "interpreter.json"), (),
           prompt_fields=("test_case_prompt", "mutated_prompt"), list_fields=("attack_type",)),
    Schema("mitre", ("mitre/mitre_benchmark_100_per_category_with_augmentation.json",
                     "mitre_benchmark_100_per_category_with_augmentation.json"), ("mitre_category",),
           prompt_fields=("test_case_prompt", "mutated_prompt")),
)}


def resolve(benchmark: str, path: str | Path) -> Path:
    """The data file of ``benchmark``: ``path`` itself if it is a file, else the official file under it."""
    schema = SCHEMAS[benchmark]
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise DatasetError(f"{benchmark}: --data {path} does not exist; herd ships no CyberSecEval data: get "
                           f"{schema.files[0]} from {DATASETS_URL}")
    looked = [path / f for f in schema.files] + [path / "datasets" / schema.files[0]]
    for candidate in looked:
        if candidate.is_file():
            return candidate
    raise DatasetError(f"{benchmark}: no data file in {path} (looked for {', '.join(str(p) for p in looked)}); "
                       f"herd ships no CyberSecEval data: get {schema.files[0]} from {DATASETS_URL}, or give the "
                       "file itself")


def check_record(benchmark: str, record: object, where: str) -> dict:
    schema = SCHEMAS[benchmark]
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    hint = f"(the official {schema.files[0]} schema; see {DATASETS_URL})"
    for name in schema.required:
        if name not in record:
            raise DatasetError(f"{where}: missing field {name!r} {hint}")
        if not isinstance(record[name], str):
            raise DatasetError(f"{where}: field {name!r} must be a string, got {type(record[name]).__name__}")
    if schema.prompt_fields:
        prompt = next((record[f] for f in schema.prompt_fields if f in record), None)
        if prompt is None:
            raise DatasetError(f"{where}: missing field {' or '.join(map(repr, schema.prompt_fields))} {hint}")
        if not isinstance(prompt, str) or not prompt:
            raise DatasetError(f"{where}: the prompt ({' or '.join(schema.prompt_fields)}) must be a non-empty "
                               "string")
    for name in schema.list_fields:
        if name not in record:
            raise DatasetError(f"{where}: missing field {name!r} {hint}")
        value = record[name]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise DatasetError(f"{where}: field {name!r} must be a list of strings, got {value!r}")
        record = {**record, name: value}
    return record


def load(benchmark: str, path: str | Path) -> tuple[Path, list[dict]]:
    """(the file read, its records) for ``benchmark`` from ``path`` (a file or a datasets folder)."""
    if benchmark not in SCHEMAS:
        raise DatasetError(f"unknown CyberSecEval benchmark {benchmark!r}: one of {', '.join(SCHEMAS)}")
    file = resolve(benchmark, path)
    try:
        records = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{benchmark}: cannot read {file}: {e}") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{benchmark}: {file} is not JSON: {e}") from None
    if not isinstance(records, list):
        raise DatasetError(f"{benchmark}: {file} must hold a JSON list of records, got {type(records).__name__}")
    if not records:
        raise DatasetError(f"{benchmark}: {file} holds no records")
    return file, [check_record(benchmark, r, f"{file} record {i}") for i, r in enumerate(records)]


def prompt_of(benchmark: str, record: dict) -> str:
    """The text sent to the model: test_case_prompt if the record has one, else mutated_prompt (as the benchmark's
    query_llm.process_prompt picks it)."""
    schema = SCHEMAS[benchmark]
    for name in schema.prompt_fields or ("test_case_prompt",):
        if name in record:
            return record[name]
    raise DatasetError(f"{benchmark}: a record has no prompt field")


def select(records: list[dict], limit: int | None) -> list[dict]:
    """At most ``limit`` records spread evenly over the file (the benchmark's --num-test-cases rule: every
    (len // limit)-th record, then the first ``limit`` of those)."""
    if not limit or limit >= len(records):
        return list(records)
    return records[::len(records) // limit][:limit]
