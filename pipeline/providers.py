"""Built-in gateway profiles: where each gateway lives, which variable holds its key.

Base URLs and models are the ones each gateway publishes for itself. EvoLink
documents a primary for text (``direct.evolink.ai``) and a fallback
(``api.evolink.ai``); StarMagic documents one base URL. A user file (TOML, one
table per provider) can add or override profiles.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UsageError
from pipeline.structured import check_mode


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    base_urls: tuple[str, ...]  # in order of preference; later ones are fallbacks
    api_key_env: str | None  # None: no key needed (the simulator)
    models: tuple[str, ...] = ()
    default_model: str | None = None
    notes: str = ""
    # How this server takes structured output, best first: "json_schema" (the default),
    # "json_object" (with the schema in response_format.schema and the system message)
    # or "prompt" (the schema in the system message only). A refusal moves on anyway.
    structured_output: str = "json_schema"


BUILTIN: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider(
            "sim",
            ("http://sim.invalid/v1",),
            None,
            ("sim-1", "gpt-5.5", "gpt-5.1", "gpt-5.1-thinking"),
            "sim-1",
            "built-in simulator, in process: no key, no network",
        ),
        Provider(
            "starmagic",
            ("https://api.starmagic.ai/v1",),
            "STARMAGIC_API_KEY",
            ("gpt-5.5", "gpt-5.1", "gpt-5.1-chat", "gpt-5.1-thinking"),
            "gpt-5.5",
            "gpt-5.1-thinking returns reasoning_content",
        ),
        Provider(
            "evolink",
            ("https://direct.evolink.ai/v1", "https://api.evolink.ai/v1"),
            "EVOLINK_API_KEY",
            ("gpt-5.5",),
            "gpt-5.5",
            "direct.evolink.ai for text, api.evolink.ai as fallback; 402 = balance",
        ),
        Provider(
            "modelstream",
            ("https://api.modelstream.ai/v1",),
            "MODELSTREAM_API_KEY",
            ("gpt-5.5",),
            "gpt-5.5",
            "reasoning_effort up to xhigh, verbosity, image_detail, up to 10 images",
        ),
        Provider(
            "openai",
            ("https://api.openai.com/v1",),
            "OPENAI_API_KEY",
            ("gpt-5.5", "gpt-5.1", "gpt-5", "gpt-5-mini", "gpt-5-nano", "gpt-4.1", "gpt-4o"),
            None,
        ),
    )
}


def load_providers(extra_file: Path | None = None) -> dict[str, Provider]:
    """The built-in profiles, plus (or overridden by) those in a user TOML file."""
    providers = dict(BUILTIN)
    if extra_file is None:
        return providers
    try:
        data = tomllib.loads(extra_file.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{extra_file}: cannot read provider file ({exc})") from None
    for name, table in data.items():
        if not isinstance(table, dict) or not table.get("base_url"):
            raise UsageError(f"{extra_file}: provider '{name}' needs a base_url")
        urls = table["base_url"]
        providers[name] = Provider(
            name,
            tuple(urls if isinstance(urls, list) else [urls]),
            table.get("api_key_env"),
            tuple(table.get("models", ())),
            table.get("default_model"),
            table.get("notes", ""),
            structured_output=_structured_output(
                table.get("structured_output", "json_schema"), extra_file, name
            ),
        )
    return providers


def _structured_output(value: object, extra_file: Path, name: str) -> str:
    try:
        return check_mode(str(value), f"{extra_file}: provider '{name}'")
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def get_provider(name: str, providers: dict[str, Provider] | None = None) -> Provider:
    table = providers or BUILTIN
    try:
        return table[name]
    except KeyError:
        known = ", ".join(sorted(table))
        raise UsageError(f"unknown provider '{name}' (known: {known})") from None
